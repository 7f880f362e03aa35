//! Atomic file writes with a mode set from creation.

use std::{
    io::{self, Write as _},
    os::unix::fs::PermissionsExt as _,
    path::Path,
};

/// What [`write_atomic`] does when the file exists.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Existing {
    /// Replace it (readers see the old or the new contents, never a mix).
    Replace,
    /// Leave it and fail with [`io::ErrorKind::AlreadyExists`].
    Refuse,
}

/// Owner read/write only: secrets (keys, tokens, grants).
pub const PRIVATE: u32 = 0o600;

/// Writes `contents` to `path` in one step: into a temporary file in the same
/// folder (created if missing) with `mode` from the start, synced to disk,
/// then renamed over `path` (or linked to it, with [`Existing::Refuse`]). A
/// crash leaves the old file or the new one, never a torn one, and the
/// contents are never readable with a wider mode.
///
/// # Errors
///
/// Any I/O error of those steps; with [`Existing::Refuse`],
/// [`io::ErrorKind::AlreadyExists`] when `path` exists.
pub fn write_atomic(path: &Path, contents: &[u8], mode: u32, existing: Existing) -> io::Result<()> {
    let dir = match path.parent() {
        Some(parent) if !parent.as_os_str().is_empty() => parent,
        _ => Path::new("."),
    };
    std::fs::create_dir_all(dir)?;
    let name = path.file_name().map_or_else(
        || ".gatekeep".into(),
        |name| format!(".{}", name.to_string_lossy()),
    );
    // `tempfile` creates the file with mode 0600; narrow or widen it before
    // anything is written.
    let mut file = tempfile::Builder::new()
        .prefix(&name)
        .suffix(".new")
        .tempfile_in(dir)?;
    file.as_file()
        .set_permissions(std::fs::Permissions::from_mode(mode))?;
    file.write_all(contents)?;
    file.as_file().sync_all()?;
    match existing {
        Existing::Replace => file.persist(path).map(drop).map_err(|err| err.error),
        Existing::Refuse => file
            .persist_noclobber(path)
            .map(drop)
            .map_err(|err| err.error),
    }
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::MetadataExt as _;

    use super::*;

    #[test]
    fn writes_with_the_mode_and_replaces_or_refuses() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("sub/token");
        write_atomic(&path, b"one", PRIVATE, Existing::Replace).expect("write");
        assert_eq!(std::fs::read(&path).expect("read"), b"one");
        let mode = std::fs::metadata(&path).expect("stat").mode();
        assert_eq!(mode & 0o777, 0o600);

        write_atomic(&path, b"two", PRIVATE, Existing::Replace).expect("replace");
        assert_eq!(std::fs::read(&path).expect("read"), b"two");

        let err = write_atomic(&path, b"three", 0o644, Existing::Refuse).expect_err("exists");
        assert_eq!(err.kind(), io::ErrorKind::AlreadyExists);
        assert_eq!(std::fs::read(&path).expect("read"), b"two");

        let public = dir.path().join("ca.pem");
        write_atomic(&public, b"cert", 0o644, Existing::Refuse).expect("new");
        let mode = std::fs::metadata(&public).expect("stat").mode();
        assert_eq!(mode & 0o777, 0o644);
        // No temporary file is left behind.
        let names: Vec<_> = std::fs::read_dir(dir.path().join("sub"))
            .expect("list")
            .map(|entry| entry.expect("entry").file_name())
            .collect();
        assert_eq!(names, ["token"]);
    }
}
