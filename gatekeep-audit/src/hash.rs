//! The chain hash of a record. The encoding is specified in the crate docs; keep them in step.

use sha2::{Digest, Sha256};

/// `prev_hash` of the first record: 64 zeros.
pub const GENESIS_HASH: &str = "0000000000000000000000000000000000000000000000000000000000000000";

/// Prefix of every hashed message; names the encoding so a later one cannot collide with it.
const DOMAIN: &[u8] = b"gatekeep-audit-v1\0";

/// The hashed fields of a record, in their stored text form.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ChainFields<'a> {
    pub seq: u64,
    /// The stored timestamp text (`2026-11-24T21:42:56.123456789Z`).
    pub at: &'a str,
    /// The stored kind name (`kernel_denied`).
    pub kind: &'a str,
    pub request_id: Option<&'a str>,
    pub host: &'a str,
    pub actor: Option<&'a str>,
    /// The stored canonical JSON text of the payload.
    pub payload: &'a str,
    /// The previous record's hash, lowercase hex.
    pub prev_hash: &'a str,
}

impl ChainFields<'_> {
    /// Lowercase hex SHA-256 of the length-prefixed encoding of the fields.
    #[must_use]
    pub fn hash(&self) -> String {
        let mut hasher = Sha256::new();
        hasher.update(DOMAIN);
        hasher.update(self.seq.to_be_bytes());
        put_str(&mut hasher, self.at);
        put_str(&mut hasher, self.kind);
        put_opt(&mut hasher, self.request_id);
        put_str(&mut hasher, self.host);
        put_opt(&mut hasher, self.actor);
        put_str(&mut hasher, self.payload);
        put_str(&mut hasher, self.prev_hash);
        hex::encode(hasher.finalize())
    }
}

fn put_str(hasher: &mut Sha256, s: &str) {
    // usize is at most 64 bits on every supported target.
    hasher.update((s.len() as u64).to_be_bytes());
    hasher.update(s.as_bytes());
}

fn put_opt(hasher: &mut Sha256, s: Option<&str>) {
    match s {
        None => hasher.update([0]),
        Some(s) => {
            hasher.update([1]);
            put_str(hasher, s);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> ChainFields<'static> {
        ChainFields {
            seq: 1,
            at: "2026-11-24T21:42:56.123456789Z",
            kind: "requested",
            request_id: Some("r-1"),
            host: "web-1",
            actor: None,
            payload: r#"{"argv":["curl","example.org"],"pid":42}"#,
            prev_hash: GENESIS_HASH,
        }
    }

    /// The crate docs' test vector, computed independently (Python `hashlib`, see the docs).
    #[test]
    fn matches_the_documented_test_vector() {
        assert_eq!(
            sample().hash(),
            "cb4085752a4836720dac1a2cbff421ebbea6c721d063ca1f91154861f42fd518"
        );
    }

    #[test]
    fn every_field_and_its_presence_changes_the_hash() {
        let base = sample();
        let variants = [
            ChainFields { seq: 2, ..base },
            ChainFields {
                at: "2026-11-24T21:42:56.123456788Z",
                ..base
            },
            ChainFields {
                kind: "decided",
                ..base
            },
            ChainFields {
                request_id: None,
                ..base
            },
            ChainFields {
                request_id: Some(""),
                ..base
            },
            ChainFields {
                host: "web-2",
                ..base
            },
            ChainFields {
                actor: Some(""),
                ..base
            },
            ChainFields {
                payload: "{}",
                ..base
            },
            ChainFields {
                prev_hash: "",
                ..base
            },
        ];
        let mut seen = vec![base.hash()];
        for variant in variants {
            let hash = variant.hash();
            assert!(!seen.contains(&hash), "{variant:?} collides");
            seen.push(hash);
        }
    }

    #[test]
    fn length_prefixes_keep_field_boundaries() {
        let a = ChainFields {
            host: "ab",
            actor: Some("c"),
            ..sample()
        };
        let b = ChainFields {
            host: "a",
            actor: Some("bc"),
            ..sample()
        };
        assert_ne!(a.hash(), b.hash());
    }
}
