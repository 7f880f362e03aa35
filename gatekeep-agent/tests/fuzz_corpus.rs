//! The agent's fuzz targets' inputs as plain tests (issue 24): every committed seed and
//! every input that once crashed a target (`fuzz/corpus/<target>/`,
//! `fuzz/regressions/<target>/`) goes through the same calls as `fuzz/agent`'s targets
//! (`ring_buffer_event`, `btf`), so `cargo test` keeps the fixed crashes fixed without a
//! fuzzing build.

#[path = "../../fuzz/inputs.rs"]
mod corpus;

use gatekeep_agent::bpf::{
    btf::{KernelBtf, Offsets},
    events::{Event, parse},
};

#[test]
fn ring_buffer_records_of_the_fuzz_corpus_parse_or_fail_cleanly() {
    let inputs = corpus::inputs("ring_buffer_event");
    assert!(inputs.len() > 10, "the ring_buffer_event seeds are missing");
    let mut parsed = 0;
    for (_path, bytes) in &inputs {
        let Ok(event) = parse(bytes) else {
            continue;
        };
        parsed += 1;
        let _ = event.name();
        let _ = format!("{event:?}");
        if let Event::Ask(request) | Event::Denied(request) | Event::Audited { request, .. } =
            &event
        {
            let _ = request.kernel_facts();
        }
    }
    assert!(
        parsed > 0,
        "no seed parsed: the seeds no longer match the records"
    );
}

#[test]
fn btf_blobs_of_the_fuzz_corpus_read_or_fail_cleanly() {
    let inputs = corpus::inputs("btf");
    assert!(!inputs.is_empty(), "the btf seeds are missing");
    let mut read = 0;
    for (_path, bytes) in &inputs {
        let Ok(btf) = KernelBtf::from_bytes(bytes.clone()) else {
            continue;
        };
        read += 1;
        let _ = Offsets::resolve(&btf);
        for name in ["task_struct", "cred"] {
            let _ = btf.struct_size(name);
            let _ = btf.member_offset(name, &["cred", "uid"]);
        }
    }
    assert!(read > 0, "no seed read: the seeds are not BTF any more");
}
