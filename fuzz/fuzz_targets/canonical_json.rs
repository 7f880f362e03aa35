//! The audit log's canonical JSON: for any JSON value, the encoder's output parses back (with
//! `serde_json`) to the same value, is a fixed point (encoding it again gives the same
//! bytes), and both encoders (from a `Value`, and straight from a serializable type) agree.
#![no_main]

use gatekeep_audit::{canonical_json, to_canonical_json};
use libfuzzer_sys::fuzz_target;
use serde_json::Value;

fuzz_target!(|data: &[u8]| {
    let Ok(value) = serde_json::from_slice::<Value>(data) else {
        return;
    };
    let Ok(text) = canonical_json(&value) else {
        return;
    };
    let back: Value = serde_json::from_str(&text)
        .unwrap_or_else(|err| panic!("canonical output is not JSON: {err}: {text}"));
    assert_eq!(
        back, value,
        "canonical output {text} reads back differently"
    );
    let again = canonical_json(&back).expect("a value that encoded once encodes again");
    assert_eq!(again, text, "canonical encoding is not a fixed point");
    let direct = to_canonical_json(&value).expect("the direct encoder takes what the other took");
    assert_eq!(direct, text, "the two canonical encoders disagree");
});
