//! `AF_UNIX` connect rules: `unix:/run/docker.sock` (a socket path) and
//! `unix:@name` (an abstract name) in `[policy.connect]`'s `allow`, `deny`
//! and `ask` lists. A destination no such rule names gets the `unix`
//! action.
//!
//! A rule matches the name the caller passes to `connect`/`sendto`, byte
//! for byte, as the kernel resolves it (see
//! [`gatekeep_common::unix_rule_hash`]): a path up to its NUL, an abstract
//! name of exactly that length. It cannot see which socket file a path
//! reaches, so a symlink, a hard link, a bind mount or a relative path to
//! the same socket is another name (`docs/policy.md`).

use gatekeep_common::{SUN_PATH_LEN, unix_rule_hash};

/// What `allow`, `deny` and `ask` entries start with to name an `AF_UNIX`
/// destination.
pub(crate) const UNIX_PREFIX: &str = "unix:";

/// Checks the name after `unix:` in `text`: an absolute, plain path, or
/// `@` and an abstract name, that fits `sun_path`; returns the name. The
/// error is the diagnostic.
pub(crate) fn parse_unix_target(text: &str) -> Result<&str, String> {
    let name = text.strip_prefix(UNIX_PREFIX).unwrap_or(text);
    let example = "e.g. \"unix:/run/docker.sock\", or \"unix:@name\" for an abstract socket";
    if name.is_empty() {
        return Err(format!("empty unix rule; name a socket, {example}"));
    }
    if name.contains('\0') {
        return Err(format!(
            "unix rule {text:?} contains a NUL byte; a path ends at its first NUL, and an abstract name cannot be written with one"
        ));
    }
    if let Some(abstract_name) = name.strip_prefix('@') {
        if abstract_name.is_empty() {
            return Err(format!(
                "unix rule {text:?} names no abstract socket; write its name after the @, {example}"
            ));
        }
        // sun_path holds the leading NUL and the name.
        if abstract_name.len() + 1 > SUN_PATH_LEN {
            return Err(format!(
                "abstract name in {text:?} is {} bytes; at most {} fit in sun_path",
                abstract_name.len(),
                SUN_PATH_LEN - 1
            ));
        }
    } else {
        if !name.starts_with('/') {
            return Err(format!(
                "unix rule path {name:?} is not absolute; the kernel resolves a relative name from the caller's working directory, so write the absolute path ({example})"
            ));
        }
        if name.len() >= SUN_PATH_LEN {
            return Err(format!(
                "unix rule path {name:?} is {} bytes; a socket path has at most {} (sun_path holds {SUN_PATH_LEN} with its NUL)",
                name.len(),
                SUN_PATH_LEN - 1
            ));
        }
        if name.len() > 1
            && (name.ends_with('/')
                || name.contains("//")
                || name.split('/').any(|part| part == "." || part == ".."))
        {
            return Err(format!(
                "unix rule path {name:?} is not in plain form (`.`, `..`, `//` or a final `/`); a rule matches the path a caller passes byte for byte, so write the plain absolute path"
            ));
        }
    }
    Ok(name)
}

/// The `sun_path` bytes of a name as rules and `policy test` cases write
/// it: `@name` is a NUL and the name, anything else the path's bytes.
#[must_use]
pub fn sun_path(name: &str) -> Vec<u8> {
    match name.strip_prefix('@') {
        Some(abstract_name) => {
            let mut bytes = Vec::with_capacity(abstract_name.len() + 1);
            bytes.push(0);
            bytes.extend_from_slice(abstract_name.as_bytes());
            bytes
        }
        None => name.as_bytes().to_vec(),
    }
}

/// The kernel's rule key of a name written as [`sun_path`] reads it.
#[must_use]
pub fn rule_hash(name: &str) -> u64 {
    unix_rule_hash(&sun_path(name))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn error(text: &str) -> String {
        parse_unix_target(text).unwrap_err()
    }

    #[test]
    fn paths_and_abstract_names_parse() {
        assert_eq!(
            parse_unix_target("unix:/run/docker.sock"),
            Ok("/run/docker.sock")
        );
        assert_eq!(parse_unix_target("unix:@gk-bus"), Ok("@gk-bus"));
        assert_eq!(sun_path("@gk-bus"), b"\0gk-bus");
        assert_eq!(sun_path("/run/x"), b"/run/x");
        assert_eq!(rule_hash("/run/x"), unix_rule_hash(b"/run/x\0junk"));
        let longest = format!("/{}", "a".repeat(SUN_PATH_LEN - 2));
        assert!(parse_unix_target(&format!("unix:{longest}")).is_ok());
        let longest = format!("@{}", "a".repeat(SUN_PATH_LEN - 1));
        assert!(parse_unix_target(&format!("unix:{longest}")).is_ok());
    }

    #[test]
    fn names_the_kernel_would_resolve_otherwise_are_refused_with_the_fix() {
        assert!(error("unix:").starts_with("empty unix rule; name a socket"));
        assert!(error("unix:@").contains("names no abstract socket"));
        assert!(error("unix:run/x.sock").contains("is not absolute"));
        assert!(error("unix:/run/../run/x.sock").contains("not in plain form"));
        assert!(error("unix:/run//x.sock").contains("not in plain form"));
        assert!(error("unix:/run/").contains("not in plain form"));
        assert!(error("unix:/a\0b").contains("NUL"));
        let long = format!("unix:/{}", "a".repeat(SUN_PATH_LEN - 1));
        assert!(error(&long).contains("at most 107"), "{}", error(&long));
        let long = format!("unix:@{}", "a".repeat(SUN_PATH_LEN));
        assert!(error(&long).contains("at most 107"), "{}", error(&long));
    }
}
