//! The BTF reader: any blob (a corrupted or truncated `/sys/kernel/btf/vmlinux`) reads into
//! types or an error, never a panic or a hang; whatever reads answers the lookups the agent
//! makes at start.
#![no_main]

use gatekeep_agent::bpf::btf::{KernelBtf, Offsets};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(btf) = KernelBtf::from_bytes(data.to_vec()) else {
        return;
    };
    let _ = btf.type_count();
    let _ = Offsets::resolve(&btf);
    for name in ["task_struct", "a", "s", "cred"] {
        let _ = btf.struct_size(name);
        let _ = btf.member_offset(name, &["a"]);
        let _ = btf.member_offset(name, &["a", "b"]);
        let _ = btf.member_size(name, &["cred", "uid"]);
    }
});
