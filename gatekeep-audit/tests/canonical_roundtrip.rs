//! The canonical JSON encoder's output reads back (with `serde_json`) to the value it
//! encoded (issue 24): the fuzz target `canonical_json`'s property, as plain tests, with
//! every input that once broke it (`fuzz/regressions/canonical_json/`).
//!
//! Found by fuzzing: `serde_json` parsed decimal numbers with a fast, not correctly
//! rounded algorithm unless its `float_roundtrip` feature is on, so the shortest
//! round-trip text of a float (what the encoder writes) could read back as a neighbouring
//! float: `1.23456789012345678901234568e+20` was encoded as `1.2345678901234567e20`, which
//! read back one unit in the last place away. The workspace now enables `float_roundtrip`.
//! (These tests passed before the fix too: a dev-dependency, `serde_json_canonicalizer`,
//! turns the feature on for test builds only. The fuzz target, built without it, is what
//! found it; its regressions run first in every `cargo xtask fuzz`.)

use std::{fs, path::PathBuf};

use gatekeep_audit::{canonical_json, to_canonical_json};
use proptest::prelude::*;
use serde_json::Value;

fn round_trips(value: &Value) {
    let text = canonical_json(value).expect("encode");
    let back: Value = serde_json::from_str(&text).expect("the output is JSON");
    assert_eq!(&back, value, "{text} reads back differently");
    assert_eq!(canonical_json(&back).expect("encode again"), text);
    assert_eq!(to_canonical_json(value).expect("direct encoder"), text);
}

#[test]
fn inputs_that_once_broke_the_round_trip_keep_round_tripping() {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../fuzz/regressions/canonical_json");
    let mut count = 0;
    for entry in fs::read_dir(&dir).expect("the regressions folder") {
        let bytes = fs::read(entry.expect("entry").path()).expect("read");
        if let Ok(value) = serde_json::from_slice::<Value>(&bytes) {
            round_trips(&value);
            count += 1;
        }
    }
    assert!(count > 0, "no regression input in {}", dir.display());
    round_trips(&serde_json::from_str("1.23456789012345678901234568e+20").expect("parse"));
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 2048, failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn every_finite_float_round_trips(bits in any::<u64>()) {
        let float = f64::from_bits(bits);
        prop_assume!(float.is_finite());
        let value = serde_json::json!([float, { "f": float }]);
        let text = canonical_json(&value).expect("encode");
        let back: Value = serde_json::from_str(&text).expect("JSON");
        prop_assert_eq!(&back, &value);
    }

    #[test]
    fn decimal_texts_read_encode_and_read_back_the_same(
        mantissa in "[1-9][0-9]{0,30}",
        fraction in "[0-9]{0,30}",
        exponent in -330i32..330,
    ) {
        let text = format!("{mantissa}.{fraction}0e{exponent}");
        let Ok(value) = serde_json::from_str::<Value>(&text) else {
            return Ok(());
        };
        round_trips(&value);
    }
}
