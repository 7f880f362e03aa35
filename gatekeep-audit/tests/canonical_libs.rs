//! Could a well-kept RFC 8785 (JCS) library replace our canonical JSON? Only if it writes
//! the very bytes the existing logs hold, since every record's hash covers its stored
//! payload text (issue 17, item 6).
//!
//! This test writes a corpus of representative payloads (the shapes the agent and the
//! service have written, with non-ASCII text, escapes, large integers and floats) into a log
//! with our encoder, reads every stored payload back, re-encodes it with `canon-json` and
//! with `serde_json_canonicalizer`, and compares bytes. The outcome (which payloads differ,
//! and why) is asserted, so a library release that changes it fails here and the decision in
//! `docs/audit-schema.md` is looked at again.

use gatekeep_audit::{AuditRecord, AuditStore, ExportFilter, RecordKind, canonical_json};
use serde_json::{Value, json};

/// Named payloads: what records have held, plus the edge cases of the encodings.
fn corpus() -> Vec<(&'static str, Value)> {
    vec![
        (
            "agent requested exec (schema 1)",
            json!({
                "pid": 4242, "ppid": 1, "tid": 4242, "uid": 1000, "gid": 1000,
                "user": "worker", "comm": "bash", "cgroup": "/agents/a1", "cgroup_id": 9811,
                "cwd": "/srv", "policy": "ai-agents", "policy_id": 3,
                "digest": "30b72b8108713af1", "kind": "exec", "exe": "/usr/bin/curl",
                "filename": "curl", "argv": ["curl", "-s", "https://example.org"], "argc": 3,
                "argv_truncated": false, "dev": 2049, "ino": 131_074, "rule": "exec default ask",
                "timeout_ms": 300_000, "on_timeout": "deny",
                "ancestry": [{"pid": 1, "comm": "init", "exe": "/sbin/init"}],
            }),
        ),
        (
            "service decided (schema 1)",
            json!({
                "policy": "ai-agents", "kind": "exec",
                "target": {"kind": "exec", "executable": "/usr/bin/git", "argv": ["git", "push"]},
                "state": "approved", "verdict": "allow", "reason": "release", "duration": "1h",
                "approvals": [{"reviewer": "alice", "reason": "release", "duration": "1h",
                               "at": "2026-12-01T10:00:00Z"}],
                "wait_ms": 5231, "final": true,
            }),
        ),
        (
            "agent connect kernel_denied (schema 1)",
            json!({
                "kind": "connect", "address": "[2001:db8::1]:443", "ip": "2001:db8::1",
                "port": 443, "sock_type": 1, "rule": "connect deny 2001:db8::/32",
                "pid": 7, "tid": 7, "comm": "python3", "ancestry": [],
            }),
        ),
        (
            "non-ASCII text",
            json!({"argv": ["échec", "日本語", "🎉", "Ω"], "cwd": "/home/zoë", "ключ": "значение"}),
        ),
        (
            "escapes and control characters",
            json!({
                "argv": ["a\"b", "back\\slash", "line\nbreak", "tab\there", "\u{1}\u{1f}",
                         "\u{7f}", "\u{1b}[2J", "\u{2028}\u{2029}", "</script>", "/"],
            }),
        ),
        (
            "integers up to 2^53",
            json!({"cgroup_id": 9_007_199_254_740_992_u64, "neg": -9_007_199_254_740_992_i64,
                   "zero": 0, "wait_ms": 18_446_744_073_709_u64}),
        ),
        (
            "integers above 2^53 (inode and dev numbers, u64 ids)",
            json!({"ino": 9_007_199_254_740_993_u64, "dev": u64::MAX, "min": i64::MIN}),
        ),
        (
            "floats written as integers",
            json!({"ratio": 1.0, "big": 1e21}),
        ),
        (
            "floats with fractions",
            json!({"ratio": 0.1, "small": 1.5e-7, "third": 1.0 / 3.0}),
        ),
        (
            "keys beyond the Basic Multilingual Plane",
            json!({"\u{e000}": 1, "\u{1f600}": 2, "a": 3}),
        ),
        (
            "nested objects, sorted at every depth",
            json!({"z": {"b": [1, {"y": null, "x": true}], "a": ""}, "A": [], "é": {}}),
        ),
    ]
}

/// Every payload as the log stores it, read back from a log written with our encoder.
fn stored_payloads(corpus: &[(&'static str, Value)]) -> Vec<String> {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("audit.db");
    let mut store = AuditStore::open(&path).expect("open");
    let records: Vec<AuditRecord> = corpus
        .iter()
        .map(|(_, payload)| AuditRecord::new(RecordKind::Requested, "web-1", payload.clone()))
        .collect();
    store.append_batch(&records).expect("append");
    drop(store);
    gatekeep_audit::verify(&path).expect("the log verifies");
    let mut out = Vec::new();
    gatekeep_audit::export(&path, &mut out, &ExportFilter::default()).expect("export");
    String::from_utf8(out)
        .expect("utf-8")
        .lines()
        .map(|line| {
            #[derive(serde::Deserialize)]
            struct Line<'a> {
                #[serde(borrow)]
                payload: &'a serde_json::value::RawValue,
            }
            let line: Line<'_> = serde_json::from_str(line).expect("line");
            line.payload.get().to_owned()
        })
        .collect()
}

/// The corpus entries whose stored bytes `encode` does not reproduce.
fn differing(
    corpus: &[(&'static str, Value)],
    stored: &[String],
    encode: impl Fn(&Value) -> String,
) -> Vec<&'static str> {
    corpus
        .iter()
        .zip(stored)
        .filter_map(|((name, _), text)| {
            let parsed: Value = serde_json::from_str(text).expect("stored json");
            (encode(&parsed) != *text).then_some(*name)
        })
        .collect()
}

#[test]
fn rfc8785_libraries_do_not_reproduce_the_stored_bytes() {
    let corpus = corpus();
    let stored = stored_payloads(&corpus);
    assert_eq!(stored.len(), corpus.len());
    // Ours reproduces itself (what verify relies on).
    for ((name, value), text) in corpus.iter().zip(&stored) {
        assert_eq!(canonical_json(value).expect("encode"), *text, "{name}");
    }

    let canon_json = differing(&corpus, &stored, |value| {
        use canon_json::CanonJsonSerialize as _;
        value.to_canon_json_string().expect("canon-json")
    });
    let jcs = differing(&corpus, &stored, |value| {
        serde_json_canonicalizer::to_string(value).expect("serde_json_canonicalizer")
    });

    // Both follow RFC 8785: object keys in UTF-16 order (U+1F600 before U+E000, where UTF-8
    // byte order has U+E000 first) and floats as ECMAScript writes them (1.0 is `1`). serde_json_canonicalizer also writes every number as an IEEE double, so
    // integers above 2^53 (inode and device numbers, u64 ids) lose digits; canon-json keeps
    // integers as serde_json writes them. Everything our payloads hold as text (non-ASCII,
    // escapes, U+2028) comes out the same.
    assert_eq!(
        canon_json,
        [
            "floats written as integers",
            "keys beyond the Basic Multilingual Plane"
        ],
        "canon-json"
    );
    assert_eq!(
        jcs,
        [
            "integers above 2^53 (inode and dev numbers, u64 ids)",
            "floats written as integers",
            "keys beyond the Basic Multilingual Plane"
        ],
        "serde_json_canonicalizer"
    );

    // What the differences look like.
    let max = json!({"dev": u64::MAX});
    assert_eq!(
        canonical_json(&max).expect("ours"),
        r#"{"dev":18446744073709551615}"#
    );
    assert_eq!(
        serde_json_canonicalizer::to_string(&max).expect("jcs"),
        r#"{"dev":18446744073709552000}"#
    );
    let floats = json!({"a": 1.0, "b": 1e21});
    assert_eq!(
        canonical_json(&floats).expect("ours"),
        r#"{"a":1.0,"b":1e+21}"#
    );
    assert_eq!(
        serde_json_canonicalizer::to_string(&floats).expect("jcs"),
        r#"{"a":1,"b":1e+21}"#
    );
}
