//! Ring-buffer records: any bytes, as an agent built against another version of the kernel
//! programs might read them (a record shorter or longer than its struct, an unknown kind,
//! lengths inside a record that overrun it), parse into an event or an error, never a panic,
//! and an event describes itself.
#![no_main]

use gatekeep_agent::bpf::events::{Event, parse};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(event) = parse(data) else {
        return;
    };
    let _ = event.name();
    let _ = event.origin();
    let _ = format!("{event:?}");
    match &event {
        Event::Ask(request) | Event::Denied(request) | Event::Audited { request, .. } => {
            let _ = request.kernel_facts();
            let _ = request.denied_because();
            let _ = request.kind_name();
        }
        _ => {}
    }
});
