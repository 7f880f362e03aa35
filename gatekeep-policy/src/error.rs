//! Errors of loading a policy set.

use std::{fmt, io, path::PathBuf};

use serde::Serialize;

/// One problem in a policy file, at a 1-based line and column.
///
/// `Display` gives the familiar compiler form:
/// `policies/agents.toml:7:9: unknown action "alow" (expected allow, deny or ask)`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Diagnostic {
    /// The file as it was named to the loader.
    pub file: String,
    pub line: usize,
    /// Counted in characters, not bytes.
    pub column: usize,
    pub message: String,
}

impl fmt::Display for Diagnostic {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}:{}:{}: {}",
            self.file, self.line, self.column, self.message
        )
    }
}

/// Why a policy set could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum PolicyError {
    #[error("failed to read policy directory {path}")]
    ReadDir {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("failed to read policy file {path}")]
    ReadFile {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    /// Every problem found in the whole file set, one per line.
    #[error("{}", DisplayLines(diagnostics))]
    Invalid { diagnostics: Vec<Diagnostic> },
}

impl PolicyError {
    /// The diagnostics of an invalid policy set; empty for I/O errors.
    #[must_use]
    pub fn diagnostics(&self) -> &[Diagnostic] {
        match self {
            PolicyError::Invalid { diagnostics } => diagnostics,
            PolicyError::ReadDir { .. } | PolicyError::ReadFile { .. } => &[],
        }
    }
}

struct DisplayLines<'a>(&'a [Diagnostic]);

impl fmt::Display for DisplayLines<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (index, diagnostic) in self.0.iter().enumerate() {
            if index > 0 {
                f.write_str("\n")?;
            }
            write!(f, "{diagnostic}")?;
        }
        Ok(())
    }
}
