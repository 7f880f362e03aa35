//! What every ring buffer record shares: the header's [`Origin`], the size
//! checked read of a record's struct, and the errors. The hooks' records
//! (in [`crate::hooks`]) and the task events ([`super::events`]) are read
//! with these.

use gatekeep_common::EventHeader;

/// Why a ring-buffer record could not be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ParseError {
    #[error("ring buffer record of {len} bytes is shorter than an event header")]
    TooShort { len: usize },
    #[error("ring buffer record of kind {kind} has {len} bytes, expected at least {expected}")]
    Truncated {
        kind: u32,
        len: usize,
        expected: usize,
    },
    #[error("unknown ring buffer record kind {kind}")]
    UnknownKind { kind: u32 },
}

/// Identity of the task and request an event is about.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Origin {
    pub policy_id: u32,
    pub pid: u32,
    pub tid: u32,
    pub uid: u32,
    pub gid: u32,
    /// The parent's pid when the hook ran.
    pub ppid: u32,
    pub cgroup_id: u64,
    /// `CLOCK_BOOTTIME` nanoseconds when the hook ran.
    pub ktime_ns: u64,
    /// Digest of the request; a verdict applies to this digest only.
    pub digest: u64,
    /// The task's `comm`.
    pub comm: String,
}

/// Reads a `T` from the start of `bytes`, which must be at least that long.
pub(crate) fn read<T: Copy>(bytes: &[u8], kind: u32) -> Result<T, ParseError> {
    let expected = size_of::<T>();
    if bytes.len() < expected {
        return Err(ParseError::Truncated {
            kind,
            len: bytes.len(),
            expected,
        });
    }
    // SAFETY: length checked above; every `T` read here is a `#[repr(C)]`
    // struct of integers and byte arrays (any bit pattern is valid), and
    // `read_unaligned` does not need the record to be aligned.
    Ok(unsafe { bytes.as_ptr().cast::<T>().read_unaligned() })
}

/// The [`Origin`] of a record's header.
pub(crate) fn origin(header: &EventHeader) -> Origin {
    Origin {
        policy_id: header.policy_id,
        pid: header.pid,
        tid: header.tid,
        uid: header.uid,
        gid: header.gid,
        ppid: header.ppid,
        cgroup_id: header.cgroup_id,
        ktime_ns: header.ktime_ns,
        digest: header.digest,
        comm: c_string(&header.comm),
    }
}

/// The bytes up to the first NUL, lossily decoded.
pub(crate) fn c_string(bytes: &[u8]) -> String {
    let end = bytes.iter().position(|b| *b == 0).unwrap_or(bytes.len());
    String::from_utf8_lossy(&bytes[..end]).into_owned()
}
