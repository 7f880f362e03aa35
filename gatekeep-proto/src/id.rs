//! Request ids: one id per paused request, from the agent that paused it to both audit logs.
//!
//! A request id is a UUID in its lowercase hyphenated text form whose leading bits are
//! random (or a hash), never a clock, so that the first eight hex digits of the ids a
//! reviewer sees almost always differ:
//!
//! - the agent mints it where the request is born, as a version 8 UUID whose 122 free bits
//!   are a SHA-256 of the host, the boot and what the kernel paused (see
//!   `gatekeep_agent::pause`); a restarted agent asking again about the same paused task
//!   mints the same id, so re-sending it is idempotent;
//! - requests made without an agent (tests, the API) get [`mint`], a random version 4 UUID.
//!
//! [`validate`] is what the service accepts from agents. [`short_ids`] gives each listed id
//! its shortest unique prefix (git style, at least [`SHORT_LEN`] digits), and
//! [`resolve_prefix`] turns a prefix a reviewer typed back into the one id it names.

use std::fmt;

use uuid::{Uuid, Variant};

/// Hex digits a short id has at least.
pub const SHORT_LEN: usize = 8;
/// Fewest characters of a prefix a command accepts.
pub const MIN_PREFIX: usize = 4;
/// Length of the hyphenated text form.
const TEXT_LEN: usize = 36;

/// Why a request id is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IdError {
    #[error(
        "`{text}` is not a request id: expected a lowercase hyphenated uuid such as `5f0c2a9e-8d41-8b7e-9a13-4c2d7e9f0a1b`"
    )]
    Format { text: String },
    #[error(
        "request id `{id}` is a version {version} uuid; request ids are version 4 (random) or 8 (minted by an agent), with random leading bits"
    )]
    Version { id: Uuid, version: usize },
    #[error("request id `{id}` is not an RFC 9562 uuid (its variant is {variant})")]
    Variant { id: Uuid, variant: String },
}

/// A random request id, for requests made without an agent.
#[must_use]
pub fn mint() -> Uuid {
    Uuid::new_v4()
}

/// A request id made from 16 bytes of a hash (the agent's: see the module docs): the version
/// (8) and variant bits are set, the other 122 bits are `hash`'s.
#[must_use]
pub fn from_hash(hash: [u8; 16]) -> Uuid {
    uuid::Builder::from_custom_bytes(hash).into_uuid()
}

/// Parses a request id as agents send it: exactly the lowercase hyphenated form.
pub fn parse(text: &str) -> Result<Uuid, IdError> {
    let format = || IdError::Format {
        text: text.chars().take(TEXT_LEN + 4).collect(),
    };
    if text.len() != TEXT_LEN
        || text
            .bytes()
            .any(|b| !(b.is_ascii_digit() || (b'a'..=b'f').contains(&b) || b == b'-'))
    {
        return Err(format());
    }
    let id = Uuid::try_parse(text).map_err(|_| format())?;
    validate(id)?;
    Ok(id)
}

/// Checks that `id` is a request id: an RFC 9562 uuid of version 4 or 8 (the nil and max
/// uuids are neither).
pub fn validate(id: Uuid) -> Result<(), IdError> {
    if id.get_variant() != Variant::RFC4122 {
        return Err(IdError::Variant {
            id,
            variant: format!("{:?}", id.get_variant()),
        });
    }
    match id.get_version_num() {
        4 | 8 => Ok(()),
        version => Err(IdError::Version { id, version }),
    }
}

/// The short form of each of `ids`: its shortest prefix of at least [`SHORT_LEN`] hex
/// digits that no other of `ids` shares (a hyphen never ends one). Equal ids get their full
/// text.
#[must_use]
pub fn short_ids(ids: &[Uuid]) -> Vec<String> {
    let texts: Vec<String> = ids.iter().map(Uuid::to_string).collect();
    let mut sorted: Vec<&str> = texts.iter().map(String::as_str).collect();
    sorted.sort_unstable();
    texts
        .iter()
        .map(|text| {
            // Only the neighbours in sorted order can share the longest prefix.
            let at = sorted.partition_point(|other| *other < text.as_str());
            let shared = [at.checked_sub(1), sorted.get(at + 1).map(|_| at + 1)]
                .into_iter()
                .flatten()
                .filter_map(|i| sorted.get(i))
                .map(|other| common_prefix(text, other))
                .max()
                .unwrap_or(0);
            let mut len = SHORT_LEN.max(shared + 1).min(TEXT_LEN);
            while len < TEXT_LEN && text.as_bytes()[len - 1] == b'-' {
                len += 1;
            }
            text[..len].to_owned()
        })
        .collect()
}

fn common_prefix(a: &str, b: &str) -> usize {
    a.bytes().zip(b.bytes()).take_while(|(x, y)| x == y).count()
}

/// A prefix a reviewer typed, in the text form ids are compared in: lowercase, with the
/// hyphens where the hyphenated form has them (`5F0C2A9E8D` -> `5f0c2a9e-8d`).
pub fn normalize_prefix(text: &str) -> Result<String, PrefixError> {
    let digits: String = text
        .trim()
        .chars()
        .filter(|c| *c != '-')
        .map(|c| c.to_ascii_lowercase())
        .collect();
    if digits.len() < MIN_PREFIX
        || digits.len() > 32
        || !digits.chars().all(|c| c.is_ascii_hexdigit())
    {
        return Err(PrefixError::Invalid {
            text: text.chars().take(TEXT_LEN + 4).collect(),
        });
    }
    let mut out = String::with_capacity(TEXT_LEN);
    for (i, c) in digits.chars().enumerate() {
        if matches!(i, 8 | 12 | 16 | 20) {
            out.push('-');
        }
        out.push(c);
    }
    Ok(out)
}

/// Why a prefix names no single id.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PrefixError {
    #[error(
        "`{text}` is not an id or id prefix: give at least {MIN_PREFIX} of its hex digits (hyphens optional)"
    )]
    Invalid { text: String },
    #[error("no {what} id starts with `{prefix}`")]
    Unknown { what: &'static str, prefix: String },
    #[error(
        "`{prefix}` is ambiguous: it starts {} {what} ids ({}); give more digits",
        candidates.len(),
        Candidates(candidates)
    )]
    Ambiguous {
        what: &'static str,
        prefix: String,
        candidates: Vec<Uuid>,
    },
}

/// `a, b, c` (at most ten, then `...`).
struct Candidates<'a>(&'a [Uuid]);

impl fmt::Display for Candidates<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, id) in self.0.iter().take(10).enumerate() {
            if i > 0 {
                f.write_str(", ")?;
            }
            write!(f, "{id}")?;
        }
        if self.0.len() > 10 {
            f.write_str(", ...")?;
        }
        Ok(())
    }
}

/// The one id of `candidates` that starts with `text` (a full id or a prefix, any case,
/// hyphens optional). `what` names the ids in errors (`request`, `grant`).
pub fn resolve_prefix(
    text: &str,
    what: &'static str,
    candidates: impl IntoIterator<Item = Uuid>,
) -> Result<Uuid, PrefixError> {
    let prefix = normalize_prefix(text)?;
    let mut found: Vec<Uuid> = candidates
        .into_iter()
        .filter(|id| id.to_string().starts_with(&prefix))
        .collect();
    found.sort_unstable();
    found.dedup();
    match found.as_slice() {
        [id] => Ok(*id),
        [] => Err(PrefixError::Unknown { what, prefix }),
        _ => Err(PrefixError::Ambiguous {
            what,
            prefix,
            candidates: found,
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(text: &str) -> Uuid {
        Uuid::try_parse(text).unwrap()
    }

    #[test]
    fn minted_and_hashed_ids_validate() {
        let minted = mint();
        assert_eq!(minted.get_version_num(), 4);
        assert!(validate(minted).is_ok());
        assert_eq!(parse(&minted.to_string()), Ok(minted));
        let hashed = from_hash([0xab; 16]);
        assert_eq!(hashed.get_version_num(), 8);
        assert_eq!(hashed.get_variant(), Variant::RFC4122);
        assert!(hashed.to_string().starts_with("abababab-abab-8bab-abab-"));
        assert_eq!(parse(&hashed.to_string()), Ok(hashed));
    }

    #[test]
    fn ids_of_other_forms_versions_and_variants_are_refused() {
        let good = "5f0c2a9e-8d41-8b7e-9a13-4c2d7e9f0a1b";
        assert!(parse(good).is_ok());
        for bad in [
            "",
            "5F0C2A9E-8D41-8B7E-9A13-4C2D7E9F0A1B",
            "5f0c2a9e8d418b7e9a134c2d7e9f0a1b",
            "{5f0c2a9e-8d41-8b7e-9a13-4c2d7e9f0a1b}",
            "5f0c2a9e-8d41-8b7e-9a13-4c2d7e9f0a1",
            "5f0c2a9e-8d41-8b7e-9a13-4c2d7e9f0a1g",
            "3987e805e-252-30b72b8108713af1",
        ] {
            assert!(
                matches!(parse(bad), Err(IdError::Format { .. })),
                "{bad} accepted"
            );
        }
        assert!(matches!(
            parse("00000000-0000-0000-0000-000000000000"),
            Err(IdError::Variant { .. })
        ));
        assert!(matches!(
            parse("ffffffff-ffff-ffff-ffff-ffffffffffff"),
            Err(IdError::Variant { .. })
        ));
        // A time-ordered v7 id: its leading digits are a clock, so short ids would collide.
        assert!(matches!(
            parse("0191ab3c-12aa-7b7e-9a13-4c2d7e9f0a1b"),
            Err(IdError::Version { version: 7, .. })
        ));
        // RFC variant bits cleared.
        assert!(matches!(
            parse("5f0c2a9e-8d41-8b7e-1a13-4c2d7e9f0a1b"),
            Err(IdError::Variant { .. })
        ));
    }

    #[test]
    fn short_ids_grow_until_unique() {
        let ids = [
            id("5f0c2a9e-8d41-8b7e-9a13-4c2d7e9f0a1b"),
            id("5f0c2a9e-8d99-4b7e-9a13-4c2d7e9f0a1b"),
            id("5f0c2a9f-0000-4000-8000-000000000000"),
            id("a0000000-0000-4000-8000-000000000000"),
        ];
        assert_eq!(
            short_ids(&ids),
            ["5f0c2a9e-8d4", "5f0c2a9e-8d9", "5f0c2a9f", "a0000000"]
        );
        // Sharing exactly eight digits: the hyphen never ends a short id.
        let ids = [
            id("12345678-aaaa-4000-8000-000000000000"),
            id("12345678-bbbb-4000-8000-000000000000"),
        ];
        assert_eq!(short_ids(&ids), ["12345678-a", "12345678-b"]);
        let one = id("12345678-aaaa-4000-8000-000000000000");
        assert_eq!(short_ids(&[one]), ["12345678"]);
        assert_eq!(short_ids(&[one, one]), [one.to_string(), one.to_string()]);
        assert!(short_ids(&[]).is_empty());
    }

    #[test]
    fn random_ids_are_unique_at_eight_digits_almost_always() {
        let ids: Vec<Uuid> = (0..200).map(|_| mint()).collect();
        let shorts = short_ids(&ids);
        let unique: std::collections::HashSet<&String> = shorts.iter().collect();
        assert_eq!(unique.len(), ids.len());
        for (short, id) in shorts.iter().zip(&ids) {
            assert_eq!(
                resolve_prefix(short, "request", ids.iter().copied()),
                Ok(*id)
            );
        }
    }

    #[test]
    fn prefixes_resolve_to_one_id_or_say_why_not() {
        let a = id("5f0c2a9e-8d41-8b7e-9a13-4c2d7e9f0a1b");
        let b = id("5f0c2a9e-8d99-4b7e-9a13-4c2d7e9f0a1b");
        let c = id("a0000000-0000-4000-8000-000000000000");
        let all = [a, b, c];
        assert_eq!(resolve_prefix("a000", "request", all), Ok(c));
        assert_eq!(resolve_prefix("5F0C2A9E8D4", "request", all), Ok(a));
        assert_eq!(resolve_prefix("5f0c2a9e-8d9", "request", all), Ok(b));
        assert_eq!(resolve_prefix(&a.to_string(), "request", all), Ok(a));
        let ambiguous = resolve_prefix("5f0c", "request", all).unwrap_err();
        assert_eq!(
            ambiguous,
            PrefixError::Ambiguous {
                what: "request",
                prefix: "5f0c".into(),
                candidates: vec![a, b],
            }
        );
        let message = ambiguous.to_string();
        assert!(message.contains(&a.to_string()) && message.contains(&b.to_string()));
        assert!(message.contains("give more digits"), "{message}");
        assert_eq!(
            resolve_prefix("bbbb", "grant", all),
            Err(PrefixError::Unknown {
                what: "grant",
                prefix: "bbbb".into()
            })
        );
        for bad in [
            "abc",
            "xyz1234",
            "",
            "5f0c2a9e-8d41-8b7e-9a13-4c2d7e9f0a1b00",
        ] {
            assert!(
                matches!(
                    resolve_prefix(bad, "request", all),
                    Err(PrefixError::Invalid { .. })
                ),
                "{bad}"
            );
        }
    }

    #[test]
    fn prefixes_get_the_hyphens_of_the_text_form() {
        assert_eq!(normalize_prefix("ABCD").unwrap(), "abcd");
        assert_eq!(normalize_prefix("0123456789ab").unwrap(), "01234567-89ab");
        assert_eq!(
            normalize_prefix("0123456789abcdef0123456789abcdef").unwrap(),
            "01234567-89ab-cdef-0123-456789abcdef"
        );
        assert_eq!(normalize_prefix("01-23-45").unwrap(), "012345");
    }
}
