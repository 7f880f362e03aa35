//! gatekeep's kernel programs.
//!
//! Everything that can be decided from maps is decided here; only a request
//! whose policy says "ask" ever leaves the kernel (as a ring-buffer event).
#![no_std]
#![no_main]
// `atomic_xadd`: the BPF target has no atomic types with read-modify-write.
#![allow(internal_features)]
#![feature(core_intrinsics)]

mod digest;
mod events;
mod hooks;
mod maps;
mod pause;

/// BPF LSM programs must declare a GPL-compatible licence or the verifier
/// refuses GPL-only helpers (`bpf_send_signal_thread`, ...).
#[unsafe(no_mangle)]
#[unsafe(link_section = "license")]
pub static LICENSE: [u8; 4] = *b"GPL\0";

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    // The verifier rejects any reachable panic path, so this never runs.
    loop {}
}
