//! The HTTP/JSON API and console routes (issue 24): any method, path, query and body, with
//! no credentials, a reviewer's token, or forged ones, gets an answer that keeps the API's
//! invariants, never a panic, a hang or an internal error. See
//! `gatekeep_server::api::http_probe` for the input's format and the invariants checked.
#![no_main]

use std::sync::LazyLock;

use gatekeep_server::api::http_probe::HttpProbe;
use libfuzzer_sys::fuzz_target;

static PROBE: LazyLock<HttpProbe> = LazyLock::new(|| {
    let dir = std::env::temp_dir().join(format!("gatekeep-fuzz-http-{}", std::process::id()));
    HttpProbe::start(&dir).unwrap_or_else(|error| panic!("cannot start the probe: {error}"))
});

fuzz_target!(|data: &[u8]| {
    if let Err(violation) = PROBE.exercise(data) {
        panic!("{violation}");
    }
});
