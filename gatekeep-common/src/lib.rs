//! Types shared by the kernel programs (`gatekeep-ebpf`) and user space.
//!
//! Everything here is `#[repr(C)]` with explicit padding so that the byte
//! layout is identical on both sides of a map or the ring buffer: the kernel
//! writes raw bytes, user space reads them back as these structs. Flags are
//! `u32` rather than `bool` because `bool` has invalid bit patterns that raw
//! kernel bytes could produce.
#![no_std]
#![expect(
    clippy::pub_underscore_fields,
    reason = "explicit padding fields must be public so both sides can build the structs"
)]

/// Length of `task_struct::comm` in the kernel (`TASK_COMM_LEN`).
pub const COMM_LEN: usize = 16;
/// Bytes of the executable path (as passed to execve) carried in an event.
pub const PATH_LEN: usize = 256;
/// Bytes of argv captured per exec (NUL-separated strings, truncated).
pub const ARGV_LEN: usize = 4096;
/// Most arguments captured per exec.
pub const ARGV_MAX_ARGS: u32 = 32;
/// Bytes of bound environment variables (`NAME=value`, NUL-separated)
/// captured per exec: the loader's `LD_*` and the policy's `bound_env`.
pub const ENV_LEN: usize = 1024;
/// Most environment entries the kernel scans for bound variables per exec;
/// an exec with more is truncated (the policy's `on_truncated` decides).
pub const ENV_MAX_SCAN: u32 = 4096;
/// Most names a policy's `exec.bound_env` lists.
pub const BOUND_ENV_NAMES: usize = 8;
/// Most bytes of a `bound_env` name, with its `=`.
pub const BOUND_ENV_NAME_LEN: usize = 32;
/// Most policies the kernel maps hold.
pub const MAX_POLICIES: u32 = 256;
/// Port rules per connect prefix (after the agent folds in the rules of
/// less specific prefixes).
pub const PORT_RULES: usize = 16;
/// How often the hook may see the same pending request again before it
/// refuses it: a stopped task re-enters only on SIGCONT, so hundreds of
/// re-entries mean SIGSTOP is being swallowed (a tracer) and the task would
/// otherwise spin.
pub const MAX_PENDING_ATTEMPTS: u32 = 256;

mod siphash;
pub use siphash::SipHash13;

/// `-ERESTARTNOINTR`: the syscall is restarted transparently after the
/// signal (our SIGSTOP/SIGCONT) is handled; never seen by user space.
pub const ERESTARTNOINTR: i32 = -513;
/// `-EPERM`.
pub const EPERM: i32 = -1;

/// The kernel maps' names: the names of the `static`s in `gatekeep-ebpf`
/// (aya's `#[map]` names a map after its static), under which the agent
/// finds them in the object and pins them (`<pin dir>/maps/<NAME>`).
///
/// The kernel side cannot use these constants (the attribute takes the
/// static's identifier), so `gatekeep-tests`' `map_names` test loads the
/// built object and checks that every name here is a map in it and every
/// map in it is named here.
pub mod map_names {
    /// cgroup id -> [`super::GatedCgroup`]: the cgroups under a policy.
    pub const GATED_CGROUPS: &str = "GATED_CGROUPS";
    /// [`super::gated_filter_slot`] -> 1: the one lookup ungated tasks pay.
    pub const GATED_FILTER: &str = "GATED_FILTER";
    /// Policy id -> [`super::PolicyDefaults`].
    pub const POLICIES: &str = "POLICIES";
    /// Thread id -> [`super::PendingRequest`]: the paused requests.
    pub const PENDING: &str = "PENDING";
    /// [`super::pending_slot`] -> thread id: the bounded pending-request slots.
    pub const PENDING_SLOTS: &str = "PENDING_SLOTS";
    /// [`super::VerdictKey`] -> [`super::Verdict`]: user space's answers.
    pub const VERDICTS: &str = "VERDICTS";
    /// [`super::GrantKey`] -> [`super::Grant`]: granted durations.
    pub const GRANTS: &str = "GRANTS";
    /// The ring buffer of events for user space.
    pub const EVENTS: &str = "EVENTS";
    /// The SHA-256 of the object the running programs came from.
    pub const BUILD_ID: &str = "BUILD_ID";
    /// Per-CPU [`super::counter`] values.
    pub const COUNTERS: &str = "COUNTERS";
    /// exec hook: [`super::ExecRuleKey`] -> [`super::ExecRule`].
    pub const EXEC_RULES: &str = "EXEC_RULES";
    /// exec hook: thread id -> the `linux_binprm` an approved exec runs
    /// with (its script's interpreter is part of the approved request).
    pub const EXEC_APPROVED: &str = "EXEC_APPROVED";
    /// exec hook: policy id -> [`super::BoundEnv`], the environment
    /// variables bound into its exec digests besides `LD_*`.
    pub const EXEC_BOUND_ENV: &str = "EXEC_BOUND_ENV";
    /// exec hook: a block of zeroes to clear the argv scratch buffer.
    pub const ZEROES: &str = "ZEROES";
    /// exec hook: per-CPU scratch buffer the argv is gathered in.
    pub const ARGV_SCRATCH: &str = "ARGV_SCRATCH";
    /// exec hook: thread id -> the argv digests an allowed exec must start
    /// its program with (checked at `sched_process_exec`).
    pub const BOUND_ARGV: &str = "BOUND_ARGV";
    /// connect hook: LPM trie of [`super::ConnectV4Key`] -> [`super::PortRules`].
    pub const CONNECT_V4: &str = "CONNECT_V4";
    /// connect hook: LPM trie of [`super::ConnectV6Key`] -> [`super::PortRules`].
    pub const CONNECT_V6: &str = "CONNECT_V6";
    /// connect hook: [`super::UnixRuleKey`] -> [`super::action`], the
    /// policies' `AF_UNIX` path and abstract name rules.
    pub const UNIX_RULES: &str = "UNIX_RULES";
    /// Self-protection (`hooks/protect`): the protections each policy relaxes.
    pub const PROTECT_RELAXED: &str = "PROTECT_RELAXED";
    /// Self-protection: gatekeep's own processes (tgid -> start time).
    pub const PROTECTED_TASKS: &str = "PROTECTED_TASKS";
    /// Self-protection: refused attempts per (protection, cgroup).
    pub const PROTECT_DENIALS: &str = "PROTECT_DENIALS";
    /// Self-protection: the decision service's listeners gated tasks cannot reach.
    pub const SERVICE_LISTENERS: &str = "SERVICE_LISTENERS";
    /// Self-protection: [`super::InodeKey`] -> [`super::protected_inode`] bits,
    /// gatekeep's own files and folders.
    pub const PROTECTED_INODES: &str = "PROTECTED_INODES";
    /// cgroup id -> 1: cgroups a policy pattern can still match a new child of.
    pub const CANDIDATE_PARENTS: &str = "CANDIDATE_PARENTS";
    /// Policy id -> hash of the policy's name (inherited gating across reloads).
    pub const POLICY_NAME_HASHES: &str = "POLICY_NAME_HASHES";
    // Host-name rules (issue 20, item 3).
    /// [`super::HostKey`] -> [`super::HostRules`]: what the host rules say
    /// about an address a workload resolved.
    pub const HOST_RULES: &str = "HOST_RULES";
    /// cgroup id -> DNS answers the kernel passed to user space (a count).
    pub const DNS_RECEIVED: &str = "DNS_RECEIVED";
    /// cgroup id -> DNS answers user space has processed (a count).
    pub const DNS_PROCESSED: &str = "DNS_PROCESSED";

    /// Every map of the object.
    pub const ALL: &[&str] = &[
        GATED_CGROUPS,
        GATED_FILTER,
        POLICIES,
        PENDING,
        PENDING_SLOTS,
        VERDICTS,
        GRANTS,
        EVENTS,
        BUILD_ID,
        COUNTERS,
        EXEC_RULES,
        EXEC_APPROVED,
        EXEC_BOUND_ENV,
        ZEROES,
        ARGV_SCRATCH,
        BOUND_ARGV,
        CONNECT_V4,
        CONNECT_V6,
        UNIX_RULES,
        PROTECT_RELAXED,
        PROTECTED_TASKS,
        PROTECT_DENIALS,
        SERVICE_LISTENERS,
        PROTECTED_INODES,
        CANDIDATE_PARENTS,
        POLICY_NAME_HASHES,
        HOST_RULES,
        DNS_RECEIVED,
        DNS_PROCESSED,
    ];
}

/// Load-time globals of the programs (`EbpfLoader::set_global`), by the
/// names of their `static`s in `gatekeep-ebpf`.
pub mod global_names {
    /// [`super::KernelOffsets`]: struct member offsets from the kernel's BTF.
    pub const KERNEL_OFFSETS: &str = "KERNEL_OFFSETS";
    /// The per-load `SipHash` key of request digests.
    pub const DIGEST_KEY: &str = "DIGEST_KEY";
    /// The inode number of `/proc/kcore` (gated tasks cannot open it).
    pub const PROC_KCORE_INO: &str = "PROC_KCORE_INO";
}

/// What a rule (or a policy default) does. `NONE` (0) means "no rule".
pub mod action {
    pub const NONE: u32 = 0;
    pub const ALLOW: u32 = 1;
    pub const DENY: u32 = 2;
    pub const ASK: u32 = 3;
}

/// Kinds of records on the `EVENTS` ring buffer: the first `u32` of every
/// record, so user space can dispatch before it knows the full type.
pub mod event_kind {
    /// An exec that needs a decision ([`super::ExecEvent`]).
    pub const EXEC_ASK: u32 = 1;
    /// An exec denied in the kernel by a rule ([`super::ExecEvent`]).
    pub const EXEC_DENIED: u32 = 2;
    /// A connect that needs a decision ([`super::ConnectEvent`]).
    pub const CONNECT_ASK: u32 = 3;
    /// A connect denied in the kernel by a rule ([`super::ConnectEvent`]).
    pub const CONNECT_DENIED: u32 = 4;
    /// A task exited while its request was pending ([`super::TaskEvent`]).
    pub const ABANDONED: u32 = 5;
    /// A pending request was refused because the task kept re-entering the
    /// hook without stopping (ptrace swallowing SIGSTOP) ([`super::TaskEvent`]).
    pub const REFUSED_SPINNING: u32 = 6;
    /// A verdict from user space was applied ([`super::TaskEvent`]).
    pub const VERDICT_APPLIED: u32 = 7;
    /// An exec met a rule whose file changed content since the policy was
    /// loaded ([`super::ExecRuleStaleEvent`]): the rule did not match.
    pub const EXEC_RULE_STALE: u32 = 8;
    /// An exec of a policy in audit mode that enforcement would have denied
    /// or asked about (`action` says which); it ran ([`super::ExecEvent`]).
    pub const EXEC_AUDITED: u32 = 9;
    /// The same for a connect, datagram or raw socket ([`super::ConnectEvent`]).
    pub const CONNECT_AUDITED: u32 = 10;
    /// An exec allowed by a verdict or grant was killed before its new
    /// program ran: the argv the kernel gave it is not the one bound
    /// ([`super::TaskEvent`]; `digest` is the allowed request's).
    pub const EXEC_ARGV_CHANGED: u32 = 17;
    /// The same, for the bound environment (`LD_*` and the policy's
    /// `bound_env`): the argv was the one bound, the bound variables the
    /// new program received are not.
    pub const EXEC_ENV_CHANGED: u32 = 18;
}

/// What a request is about; also in [`PendingRequest::kind`].
pub mod request_kind {
    pub const EXEC: u32 = 1;
    pub const CONNECT: u32 = 2;
}

/// Indices into the per-CPU `COUNTERS` array.
pub mod counter {
    /// `bprm_check_security` ran for a task in a gated cgroup.
    pub const EXEC_GATED: u32 = 0;
    /// An event could not be reserved on the ring buffer (user space is
    /// behind). Asked requests are still paused and found again later.
    pub const EVENTS_DROPPED: u32 = 1;
    pub const EXEC_ALLOWED: u32 = 2;
    pub const EXEC_DENIED: u32 = 3;
    pub const EXEC_ASKED: u32 = 4;
    pub const CONNECT_GATED: u32 = 5;
    pub const CONNECT_ALLOWED: u32 = 6;
    pub const CONNECT_DENIED: u32 = 7;
    pub const CONNECT_ASKED: u32 = 8;
    /// A paused task re-entered the hook without a verdict (stray SIGCONT)
    /// and was stopped again.
    pub const REPAUSED: u32 = 9;
    /// A verdict from user space was consumed.
    pub const VERDICTS_APPLIED: u32 = 10;
    /// Argv could not be captured (map full or unreadable); the request
    /// carries no argv.
    pub const ARGV_MISSED: u32 = 11;
    /// An "ask" action was allowed by a granted duration (`GRANTS`).
    pub const GRANT_ALLOWED: u32 = 12;
    /// An exec met a rule bound to other content than the file has now
    /// (rewritten in place since the policy was loaded).
    pub const EXEC_RULE_STALE: u32 = 13;
    /// An exec allowed by a verdict or grant ran with another argv than the
    /// one bound (changed in the caller's memory after the kernel copied
    /// it): the new program was killed before it ran.
    pub const EXEC_ARGV_CHANGED: u32 = 14;
    /// The same for the bound environment: its argv was the one bound, its
    /// bound variables were not.
    pub const EXEC_ENV_CHANGED: u32 = 15;
    /// Number of counters; size of the `COUNTERS` map.
    pub const COUNT: u32 = 16;
}

/// Value of the `GATED_CGROUPS` map: which policy governs a cgroup.
///
/// Keyed by the cgroup v2 id (the cgroup directory's inode number, as
/// returned by `bpf_get_current_cgroup_id`).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct GatedCgroup {
    /// Index into `POLICIES`, assigned by the agent when it compiles policies.
    pub policy_id: u32,
    /// [`GATED_INHERITED`] when the kernel added the entry itself.
    pub flags: u32,
}

/// [`GatedCgroup::flags`]: the kernel gated this cgroup because a gated
/// task created it or moved a task into it, so leaving gating by way of a
/// new cgroup never works, not even until the agent's next rescan.
pub const GATED_INHERITED: u32 = 1;

/// Slots of `GATED_FILTER`, the kernel's first, cheap test of whether a
/// cgroup may be gated (a power of two).
pub const GATED_FILTER_SLOTS: u32 = 16384;

/// The `GATED_FILTER` slot of `cgroup_id`. Whoever adds a cgroup to
/// `GATED_CGROUPS` sets its slot to 1 first; slots are never cleared, so a
/// 0 means "not gated" for certain and a 1 means "look it up".
#[must_use]
#[inline]
pub const fn gated_filter_slot(cgroup_id: u64) -> u32 {
    #[expect(
        clippy::cast_possible_truncation,
        reason = "masked below GATED_FILTER_SLOTS"
    )]
    let slot = (cgroup_id & (GATED_FILTER_SLOTS as u64 - 1)) as u32;
    slot
}

/// Slots of `PENDING_SLOTS` (a power of two): per slot, how many `PENDING`
/// entries the kernel added less those it removed, so that a thread exit
/// whose slot reads 0 skips the `PENDING` lookup.
pub const PENDING_SLOTS: u32 = 4096;

/// The `PENDING_SLOTS` slot of thread `tid`.
#[must_use]
#[inline]
pub const fn pending_slot(tid: u32) -> u32 {
    tid & (PENDING_SLOTS - 1)
}

/// Value of the `POLICIES` array: what a policy does when no rule matches.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PolicyDefaults {
    /// [`action`] for an exec that no exec rule matches.
    pub exec_default: u32,
    /// [`action`] for an IPv4/IPv6 connect that no connect rule matches.
    pub connect_default: u32,
    /// [`action`] for an `AF_UNIX` connect or datagram (the policy's
    /// `unix`, else its connect default).
    pub unix_action: u32,
    /// Generation of the policy set; lets user space tell stale entries.
    pub generation: u32,
    /// [`action`] (`ALLOW` or `DENY`) for creating a raw socket (`SOCK_RAW`
    /// in any family but `AF_NETLINK`) or a packet socket (`AF_PACKET`);
    /// `NONE` reads as `DENY`.
    pub raw_action: u32,
    /// [`action`] for a connect or a datagram to an address family other
    /// than inet, inet6 and unix (netlink to the kernel excepted); `NONE`
    /// reads as `connect_default`.
    pub other_action: u32,
    /// [`action`] (`DENY` or `ASK`) for an exec on the ask path whose argv
    /// the kernel could not bind completely (more than [`ARGV_MAX_ARGS`]
    /// arguments or [`ARGV_LEN`] bytes, an unreadable argument, a compat
    /// syscall): the digest would not cover all of it, so it is never
    /// granted, and only `ASK` lets a reviewer see it (marked truncated).
    /// `NONE` and anything else read as `DENY`.
    pub on_truncated: u32,
    /// Non-zero when the policy is in audit mode (`mode = "audit"`): the
    /// hooks deny and pause nothing of its own rules; where they would,
    /// they report it ([`event_kind::EXEC_AUDITED`],
    /// [`event_kind::CONNECT_AUDITED`]) and let the syscall through.
    /// Self-protection is enforced whatever the mode.
    pub audit: u32,
    // Code that runs without an exec (issue 19, item 2).
    /// [`action`] for a `PROT_EXEC` mapping of a file no exec rule names
    /// (`mmap_file`, `file_mprotect`): `ALLOW` (the policy's
    /// `unlisted_mappings = "allow"`, its default, so ordinary dynamic
    /// linking works) or the exec default (`"default"`). `ASK` reads as
    /// `DENY` (a mapping is never paused); `NONE` reads as `ALLOW`.
    pub map_unlisted: u32,
    /// [`action`] for an exec of a file with no name on disk (no links:
    /// `memfd_create`, `O_TMPFILE`, a deleted file), whatever its rules:
    /// the policy's `fileless`. `NONE` reads as `DENY`.
    pub fileless: u32,
}

/// Key of the `EXEC_RULES` map: an executable's identity within a policy.
///
/// Identity is the (device, inode) of the file the kernel is about to run,
/// so a symlink, a relative path, `..` or a hard link reach the same rule.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct ExecRuleKey {
    pub policy_id: u32,
    pub _pad: u32,
    /// `super_block::s_dev` in the kernel's encoding (`MKDEV`: major << 20 | minor).
    pub dev: u64,
    pub ino: u64,
}

/// The content version of a file, as the kernel keeps it in `struct inode`:
/// what changes when the file is written in place (same device and inode).
///
/// Every write of the data or the attributes sets `ctime` (`i_ctime_sec`,
/// `i_ctime_nsec`: on v6.12 a coarse, jiffy-granular clock; see
/// `docs/threat-model.md`) and usually `i_size`; `i_generation` tells a
/// reused inode number from the file that had it (filesystems that keep one).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ContentVersion {
    pub ctime_sec: i64,
    pub ctime_nsec: u32,
    /// `i_generation`.
    pub generation: u32,
    /// `i_size`.
    pub size: i64,
}

/// Value of the `EXEC_RULES` map: the rule's action, and the content its
/// file had when the agent compiled the rule (policy load or reload). The
/// kernel applies the rule only while the file still has that content; a
/// file rewritten in place meets the policy default instead (never a laxer
/// action than the rule's own) and is reported ([`event_kind::EXEC_RULE_STALE`]).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ExecRule {
    /// [`action`].
    pub action: u32,
    /// [`exec_rule_flags`].
    pub flags: u32,
    pub content: ContentVersion,
}

/// Value of the `EXEC_BOUND_ENV` map: the environment variables a policy
/// binds into its exec digests (and shows reviewers) besides the loader's
/// `LD_*`, which are always bound.
///
/// Name `i` is `names[i]`: its bytes followed by `=`, zero padded, read as
/// little-endian words; `masks[i]` has `0xff` in each byte the name (with
/// its `=`) covers. An environment string `s` is bound when, for every
/// word `w` of its first [`BOUND_ENV_NAME_LEN`] bytes (zero padded),
/// `w & masks[i][w] == names[i][w]`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct BoundEnv {
    /// Names used (at most [`BOUND_ENV_NAMES`]).
    pub count: u32,
    pub _pad: u32,
    pub names: [[u64; BOUND_ENV_NAME_LEN / 8]; BOUND_ENV_NAMES],
    pub masks: [[u64; BOUND_ENV_NAME_LEN / 8]; BOUND_ENV_NAMES],
}

impl BoundEnv {
    /// The entry for `names` (each without its `=`), or `None` when there
    /// are more than [`BOUND_ENV_NAMES`], or one is empty, contains `=` or
    /// NUL, or is longer than [`BOUND_ENV_NAME_LEN`] - 1 bytes.
    #[must_use]
    pub fn from_names(names: &[&[u8]]) -> Option<Self> {
        if names.len() > BOUND_ENV_NAMES {
            return None;
        }
        let mut out = Self {
            count: u32::try_from(names.len()).ok()?,
            ..Self::default()
        };
        for (i, name) in names.iter().enumerate() {
            if name.is_empty()
                || name.len() >= BOUND_ENV_NAME_LEN
                || name.iter().any(|b| *b == b'=' || *b == 0)
            {
                return None;
            }
            let mut bytes = [0u8; BOUND_ENV_NAME_LEN];
            let mut mask = [0u8; BOUND_ENV_NAME_LEN];
            bytes[..name.len()].copy_from_slice(name);
            bytes[name.len()] = b'=';
            mask[..=name.len()].fill(0xff);
            for word in 0..BOUND_ENV_NAME_LEN / 8 {
                let at = word * 8;
                let mut b = [0u8; 8];
                let mut m = [0u8; 8];
                b.copy_from_slice(&bytes[at..at + 8]);
                m.copy_from_slice(&mask[at..at + 8]);
                out.names[i][word] = u64::from_le_bytes(b);
                out.masks[i][word] = u64::from_le_bytes(m);
            }
        }
        Some(out)
    }
}

/// [`ExecRule::flags`].
pub mod exec_rule_flags {
    /// `content.generation` was read from the file (`FS_IOC_GETVERSION`) and
    /// is compared; filesystems without the ioctl (tmpfs) leave it unset,
    /// and the kernel compares ctime and size only.
    pub const GENERATION: u32 = 1;
    /// The policy's `integrity = "sha256"`: an allow rule whose file has
    /// other content than the rule was bound to is asked (the agent hashes
    /// the file and allows it while its SHA-256 is the bound one, else
    /// applies the default), not reported stale.
    pub const SHA256: u32 = 2;
}

/// Event [`event_kind::EXEC_RULE_STALE`]: an exec of a file whose rule was
/// bound to other content. `header.digest` is the exec's request digest.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ExecRuleStaleEvent {
    pub header: EventHeader,
    pub dev: u64,
    pub ino: u64,
    /// The content the rule was bound to.
    pub bound: ContentVersion,
    /// The content the file has now.
    pub found: ContentVersion,
    /// The rule's [`action`], and the [`action`] applied instead.
    pub rule_action: u32,
    pub applied_action: u32,
    /// The rule's [`exec_rule_flags`].
    pub rule_flags: u32,
    pub _pad: u32,
}

/// One port range rule of a connect prefix.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PortRule {
    /// Inclusive port range, host byte order.
    pub port_lo: u16,
    pub port_hi: u16,
    /// [`action`]; `NONE` ends the list.
    pub action: u32,
}

/// Value of the `CONNECT_V4`/`CONNECT_V6` LPM tries: the rules of the most
/// specific matching prefix, in order, followed by the rules inherited from
/// less specific prefixes (folded in by the agent, because an LPM lookup
/// returns only the longest match). The first rule whose range holds the
/// port decides; none -> the policy default.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PortRules {
    pub rules: [PortRule; PORT_RULES],
}

/// LPM trie key data for IPv4 rules: policy id (big endian, so it forms the
/// leading 32 bits of the prefix) then the address (network order).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ConnectV4Key {
    pub policy_id_be: [u8; 4],
    pub addr: [u8; 4],
}

/// LPM trie key data for IPv6 rules; see [`ConnectV4Key`].
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ConnectV6Key {
    pub policy_id_be: [u8; 4],
    pub addr: [u8; 16],
}

/// Most `AF_UNIX` name rules (`unix:/path`, `unix:@name`) over all policies.
pub const MAX_UNIX_RULES: u32 = 16384;
/// Bytes of `sockaddr_un::sun_path`: the most an `AF_UNIX` name holds.
pub const SUN_PATH_LEN: usize = 108;

/// Key of the `UNIX_RULES` map: a policy and the [`unix_rule_hash`] of the
/// `AF_UNIX` name its rule names.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct UnixRuleKey {
    pub policy_id: u32,
    pub _pad: u32,
    pub name: u64,
}

/// The fixed `SipHash` key of [`unix_rule_hash`]. Not secret: the kernel and
/// the policy compiler must agree on it across agent restarts and programs
/// loaded at different times (the request digests' key changes per load).
/// A workload would need a second preimage of a 64-bit `SipHash` value to
/// pass one name off as another.
pub const UNIX_RULE_HASH_KEY: [u64; 2] = [0x6761_7465_6b65_6570, 0x756e_6978_2d72_756c];

/// `word` with only its first `within` bytes (little endian) kept.
#[must_use]
#[expect(
    clippy::inline_always,
    reason = "called per word in the eBPF programs' loops"
)]
#[inline(always)]
pub fn keep_bytes(word: u64, within: usize) -> u64 {
    match within {
        0 => 0,
        1..8 => word & ((1u64 << (within * 8)) - 1),
        _ => word,
    }
}

/// `word` (little endian) up to its first NUL byte, the rest zeroed, and
/// whether it had a NUL. Branch-free (the classic "has a zero byte" test:
/// its lowest set bit marks exactly the first NUL), so the kernel's loop
/// over a name stays small.
#[must_use]
#[inline(always)]
pub fn until_nul(word: u64) -> (u64, bool) {
    const ONES: u64 = 0x0101_0101_0101_0101;
    const HIGHS: u64 = 0x8080_8080_8080_8080;
    let nuls = word.wrapping_sub(ONES) & !word & HIGHS;
    if nuls == 0 {
        return (word, false);
    }
    // The lowest flagged byte's high bit, moved to that byte's low bit:
    // minus one masks the bytes before it.
    let first = nuls & nuls.wrapping_neg();
    (word & ((first >> 7) - 1), true)
}

/// The name an `AF_UNIX` rule matches, hashed as the kernel hashes the
/// destination of a connect or datagram (`gatekeep-ebpf/src/hooks/connect.rs`,
/// `unix_rule_name`): what the kernel resolves, nothing more.
///
/// - A pathname (first byte not NUL) is its bytes up to the first NUL
///   (`unix_mkname_bsd()` in `net/unix/af_unix.c`, v6.12, ignores the rest),
///   after a zero word.
/// - An abstract name (first byte NUL) is every byte of its length, that
///   NUL included (`unix_find_abstract()` compares the whole length), after
///   a word holding the length: `@a` and `@a\0` are two sockets.
///
/// `name` is the `sun_path` bytes within the caller's length (at most
/// [`SUN_PATH_LEN`]; more is cut).
#[must_use]
pub fn unix_rule_hash(name: &[u8]) -> u64 {
    let name = &name[..name.len().min(SUN_PATH_LEN)];
    let abstract_name = name.first() == Some(&0);
    let mut hash = SipHash13::new(UNIX_RULE_HASH_KEY);
    hash.word(if abstract_name { name.len() as u64 } else { 0 });
    let mut ended = false;
    for i in 0..SUN_PATH_LEN.div_ceil(8) {
        let mut bytes = [0u8; 8];
        for (j, byte) in bytes.iter_mut().enumerate() {
            *byte = name.get(i * 8 + j).copied().unwrap_or(0);
        }
        let mut word = u64::from_le_bytes(bytes);
        if !abstract_name {
            if ended {
                word = 0;
            } else {
                (word, ended) = until_nul(word);
            }
        }
        hash.word(word);
    }
    hash.finish()
}

/// Value of the `PENDING` map (keyed by thread id): a request that is
/// waiting for a verdict while its task is stopped.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PendingRequest {
    /// Digest of what was asked (executable identity + argv, or family +
    /// address + port + socket type). A verdict applies only to this digest.
    pub digest: u64,
    /// `bpf_ktime_get_boot_ns` when the request was first made.
    pub created_ns: u64,
    /// [`request_kind`].
    pub kind: u32,
    /// How often the hook saw this request again without a verdict.
    pub attempts: u32,
    /// Thread group id of the paused task.
    pub pid: u32,
    pub policy_id: u32,
    /// The paused thread's start time (`task_struct::start_boottime`, ns):
    /// with the thread id, the identity of the task that asked. A thread
    /// id reused by a later task never matches it.
    pub start_ns: u64,
}

/// Key of the `VERDICTS` map: a verdict is for one task (thread id *and*
/// start time, so never for a later task that reuses the id) and one digest.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct VerdictKey {
    pub tid: u32,
    pub _pad: u32,
    pub digest: u64,
    /// [`PendingRequest::start_ns`] of the task the verdict is for.
    pub start_ns: u64,
}

/// Value of the `VERDICTS` map, written by the agent before it sends SIGCONT.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Verdict {
    /// [`action::ALLOW`] or [`action::DENY`].
    pub action: u32,
    pub _pad: u32,
    /// `CLOCK_BOOTTIME` nanoseconds after which the verdict is void (the
    /// task never came back for it).
    pub expires_ns: u64,
}

/// Key of the `GRANTS` map: a reviewer's "allow for a while" for one exact
/// request (same digest: same executable and argv, or same destination)
/// under one policy, for one workload or the whole policy.
///
/// The scope is part of the key, so a workload's grant and a policy-wide
/// grant for the same request are two entries: the ask path looks up the
/// asking cgroup's key first, then the policy-wide one (`cgroup_id` 0).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct GrantKey {
    pub policy_id: u32,
    /// [`request_kind`].
    pub kind: u32,
    pub digest: u64,
    /// The workload (cgroup v2 id) the grant covers; 0 = every cgroup of
    /// the policy (a reviewer chose scope "policy").
    pub cgroup_id: u64,
}

/// Value of the `GRANTS` map, installed by the agent when a reviewer grants
/// a duration; the kernel then allows the request without asking.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Grant {
    /// `CLOCK_BOOTTIME` nanoseconds when the grant lapses; 0 = no expiry
    /// ("always", or "session" which the agent removes with the cgroup).
    pub expires_ns: u64,
    /// Equal to the key's [`GrantKey::cgroup_id`] (the kernel checks it
    /// again: an entry whose value disagrees with its key covers nothing
    /// beyond its key).
    pub cgroup_id: u64,
}

/// What every event starts with.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct EventHeader {
    /// [`event_kind`].
    pub kind: u32,
    pub policy_id: u32,
    /// Thread group id (user space's "pid").
    pub pid: u32,
    /// Thread id of the calling thread.
    pub tid: u32,
    pub uid: u32,
    pub gid: u32,
    /// Thread group id of the parent (`real_parent->tgid`) at the hook, so
    /// the record names it even if the task is gone before user space looks.
    pub ppid: u32,
    pub _pad: u32,
    /// cgroup v2 id of the calling task.
    pub cgroup_id: u64,
    /// `bpf_ktime_get_boot_ns` when the hook ran.
    pub ktime_ns: u64,
    /// Digest of the request (see [`PendingRequest::digest`]).
    pub digest: u64,
    /// Name of the calling task, NUL padded.
    pub comm: [u8; COMM_LEN],
}

/// Why the kernel denied an exec (`ExecEvent::denied_for`).
pub mod exec_denied_for {
    /// A deny rule or default.
    pub const POLICY: u32 = 0;
    /// The policy said ask, but the argv was truncated and the policy's
    /// `on_truncated` is deny.
    pub const ARGV_TRUNCATED: u32 = 1;
}

/// [`ExecEvent::flags`]: what kind of code the event is about.
pub mod exec_flags {
    /// Not an exec: a file mapped as code (`mmap` or `mprotect` with
    /// `PROT_EXEC`: ld.so running a program it was handed, `LD_PRELOAD`,
    /// `dlopen`). `filename` is the file's name in its folder (the dentry's
    /// name); argv is empty.
    pub const MAPPED: u32 = 1;
    /// The file has no name on disk (no links: `memfd_create`, `O_TMPFILE`,
    /// a deleted file): `filename` is the dentry's name (`memfd:NAME` for a
    /// memfd), which the workload chose.
    pub const FILELESS: u32 = 2;
    /// The kernel checks a script's interpreter (or a `binfmt_misc`
    /// handler): the file is the interpreter, `filename` and argv are the
    /// script's as exec'd (the script itself was checked just before).
    pub const INTERPRETER: u32 = 4;
}

/// An exec request or denial.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct ExecEvent {
    pub header: EventHeader,
    /// Identity of the file about to run.
    pub dev: u64,
    pub ino: u64,
    /// Its content version (part of the request digest).
    pub content: ContentVersion,
    /// [`action`] the kernel applied or asks about.
    pub action: u32,
    pub argc: u32,
    pub argv_len: u32,
    /// Non-zero when the kernel could not capture the whole argv (too
    /// long, unreadable, or a compat syscall), or the bound environment
    /// (more than [`ENV_LEN`] bytes, or more than [`ENV_MAX_SCAN`]
    /// entries): `argv` and `env` hold prefixes.
    pub argv_truncated: u32,
    /// [`exec_denied_for`]: why an `EXEC_DENIED` was denied.
    pub denied_for: u32,
    /// [`exec_flags`] (0: an exec of a file with a name on disk).
    pub flags: u32,
    /// The path as passed to execve (may be relative), NUL terminated.
    pub filename: [u8; PATH_LEN],
    pub argv: [u8; ARGV_LEN],
    /// Bytes of `env` used.
    pub env_len: u32,
    /// Bound environment variables captured.
    pub env_count: u32,
    /// The bound environment variables (`LD_*` and the policy's
    /// `bound_env`), `NAME=value` strings, NUL-separated, in the order the
    /// exec passed them; part of the digest. Those that did not fit make
    /// the request truncated (`argv_truncated`).
    pub env: [u8; ENV_LEN],
}

/// A connect request or denial.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ConnectEvent {
    pub header: EventHeader,
    /// `AF_INET`, `AF_INET6` or `AF_UNIX`.
    pub family: u32,
    /// `SOCK_STREAM`, `SOCK_DGRAM`, ...
    pub sock_type: u32,
    /// Host byte order (0 for ICMP and raw sockets, whose `sin_port` the
    /// kernel ignores). For [`connect_op::SOCKET`], the socket's protocol.
    pub port: u16,
    /// [`connect_op`]: which call the decision was made for.
    pub op: u16,
    /// [`action`] the kernel applied or asks about.
    pub action: u32,
    /// IPv4 in the first 4 bytes, or IPv6; network order (`0.0.0.0` and `::`
    /// already replaced by the loopback address they reach). For `AF_UNIX`,
    /// the first bytes of `sun_path` live in `unix_path`; for other
    /// families, the bytes of the address after its family (zero past the
    /// caller's length).
    pub addr: [u8; 16],
    pub unix_path: [u8; 108],
    /// For `AF_UNIX`, how many bytes of `unix_path` the caller's address
    /// holds (its length minus the family, at most 108): an abstract name's
    /// trailing NULs within it are part of the name. 0 for other families.
    pub unix_len: u32,
}

/// [`ConnectEvent::op`]: the call a connect decision was made for. The
/// decision (rules, defaults, digest) is the same for all of them: a
/// datagram sent to an address goes where a connect to it would.
pub mod connect_op {
    /// `connect()` (`socket_connect`).
    pub const CONNECT: u16 = 0;
    /// `sendto()`/`sendmsg()`/`sendmmsg()` with a destination, TCP Fast
    /// Open included (`socket_sendmsg`).
    pub const SENDMSG: u16 = 1;
    /// `socket()` of a raw or packet socket (`socket_create`); no address.
    pub const SOCKET: u16 = 2;
}

/// A lifecycle event about a task's pending request.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TaskEvent {
    pub header: EventHeader,
    /// [`request_kind`].
    pub request_kind: u32,
    /// For `VERDICT_APPLIED`: the [`action`] applied.
    pub action: u32,
}

/// Kernel struct member offsets (bytes), read from the running kernel's BTF
/// by the agent and set as a global before loading: Rust BPF programs have
/// no CO-RE relocations, and these layouts differ between kernels.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct KernelOffsets {
    pub linux_binprm_file: u32,
    pub linux_binprm_filename: u32,
    pub linux_binprm_interp: u32,
    pub linux_binprm_buf: u32,
    pub file_f_inode: u32,
    pub inode_i_ino: u32,
    pub inode_i_sb: u32,
    pub super_block_s_dev: u32,
    pub task_struct_ptrace: u32,
    pub socket_type: u32,
    pub task_struct_real_parent: u32,
    pub task_struct_tgid: u32,
    /// `struct inode` -> `i_mode` (`umode_t`, 2 bytes).
    pub inode_i_mode: u32,
    /// `struct inode` -> `i_rdev` (`dev_t`, 4 bytes).
    pub inode_i_rdev: u32,
    /// `struct super_block` -> `s_magic` (`unsigned long`).
    pub super_block_s_magic: u32,
    /// `struct task_struct` -> `group_leader` (`struct task_struct *`).
    pub task_struct_group_leader: u32,
    /// `struct task_struct` -> `start_boottime` (`u64`, nanoseconds).
    pub task_struct_start_boottime: u32,
    // File and cgroup protections (issue 18).
    /// `struct file` -> `f_path.dentry` (`struct dentry *`).
    pub file_f_path_dentry: u32,
    /// `struct file` -> `f_mode` (`fmode_t`, 32 bits).
    pub file_f_mode: u32,
    /// `struct dentry` -> `d_parent` (`struct dentry *`).
    pub dentry_d_parent: u32,
    /// `struct dentry` -> `d_inode` (`struct inode *`).
    pub dentry_d_inode: u32,
    /// `struct cgroup` -> `kn` (`struct kernfs_node *`).
    pub cgroup_kn: u32,
    /// `struct kernfs_node` -> `id` (`u64`): the cgroup id of a cgroup's node.
    pub kernfs_node_id: u32,
    /// `struct kernfs_node` -> `parent` (`struct kernfs_node *`).
    pub kernfs_node_parent: u32,
    /// `struct cgroup` -> `root` (`struct cgroup_root *`).
    pub cgroup_root: u32,
    /// `struct cgroup_root` -> `hierarchy_id` (`int`): 0 for cgroup v2.
    pub cgroup_root_hierarchy_id: u32,
    // Egress beyond connect (issue 19, item 6).
    /// `struct msghdr` -> `msg_name` (`void *`): the destination of a send,
    /// copied into kernel memory before `security_socket_sendmsg`.
    pub msghdr_msg_name: u32,
    /// `struct msghdr` -> `msg_namelen` (`int`).
    pub msghdr_msg_namelen: u32,
    /// `struct socket` -> `sk` (`struct sock *`).
    pub socket_sk: u32,
    /// `struct sock` -> `__sk_common.skc_family` (`unsigned short`).
    pub sock_skc_family: u32,
    /// `struct sock` -> `sk_protocol` (`u16`).
    pub sock_sk_protocol: u32,
    // Exec identity bound to content (issue 19, item 1).
    /// `struct inode` -> `i_ctime_sec` (`time64_t`; `__i_ctime.tv_sec` before v6.11).
    pub inode_i_ctime_sec: u32,
    /// `struct inode` -> `i_ctime_nsec` (`u32`; the low half of
    /// `__i_ctime.tv_nsec` before v6.11).
    pub inode_i_ctime_nsec: u32,
    /// `struct inode` -> `i_size` (`loff_t`).
    pub inode_i_size: u32,
    /// `struct inode` -> `i_generation` (`u32`).
    pub inode_i_generation: u32,
    // Code that runs without an exec (issue 19, item 2).
    /// `struct task_struct` -> `mm` (`struct mm_struct *`).
    pub task_struct_mm: u32,
    /// `struct mm_struct` -> `exe_file` (`struct file *`).
    pub mm_struct_exe_file: u32,
    /// `struct vm_area_struct` -> `vm_file` (`struct file *`).
    pub vm_area_struct_vm_file: u32,
    /// `struct inode` -> `__i_nlink` (`unsigned int`).
    pub inode_i_nlink: u32,
    /// `struct dentry` -> `d_name.name` (`const unsigned char *`).
    pub dentry_d_name_name: u32,
    // argv checked in the new image (issue 19, item 3).
    /// `struct mm_struct` -> `arg_start` (`unsigned long`).
    pub mm_struct_arg_start: u32,
    /// `struct mm_struct` -> `arg_end` (`unsigned long`).
    pub mm_struct_arg_end: u32,
    /// `struct mm_struct` -> `env_end` (`unsigned long`); the environment
    /// starts at `arg_end` (`create_elf_tables()` sets both).
    pub mm_struct_env_end: u32,
}

/// [`GatedCgroup::flags`]: the cgroup appeared under a *candidate parent*
/// (a cgroup below which some policy pattern can match) and the agent has not
/// classified it yet. Its tasks' gated actions wait (stopped, like a pause)
/// until the agent replaces the entry with the real policy or removes it, so
/// a cgroup that should be gated never runs ungated, not even for the
/// moment before the agent sees it. The entry's `policy_id` is
/// [`UNCLASSIFIED_POLICY`].
pub const GATED_UNCLASSIFIED: u32 = 2;

/// `policy_id` of an unclassified cgroup's entry: no policy slot
/// (`>= MAX_POLICIES`), so no rule, grant or relaxation ever applies to it.
pub const UNCLASSIFIED_POLICY: u32 = u32::MAX;

/// Event kind (`EVENTS`) of a gated action in an unclassified cgroup
/// ([`TaskEvent`]): the task is stopped until the agent has classified its
/// cgroup and sent SIGCONT. Numbered from 16 so the kinds other branches
/// append stay apart.
pub const EVENT_CGROUP_UNCLASSIFIED: u32 = 16;

// Host-name rules (issue 20, item 3): DNS answers observed per workload.

/// Event kind (`EVENTS`) of a DNS packet a gated workload sent or received
/// ([`DnsEvent`]).
pub const EVENT_DNS_PACKET: u32 = 40;
/// Event kind (`EVENTS`) of a connect or datagram that waits until user
/// space has processed the DNS answers its workload received, or refreshed
/// an expired [`HostRules`] entry ([`TaskEvent`]): the thread is stopped,
/// like a pause; user space sends SIGCONT once it has caught up, and the
/// restarted syscall is decided with what it learned.
pub const EVENT_DNS_WAIT: u32 = 41;

/// UDP payload bytes of a DNS packet copied to user space. Longer answers
/// are cut, fail to parse, and teach nothing (the IP rules decide).
pub const DNS_PAYLOAD_LEN: usize = 1024;

/// [`DnsEvent::direction`].
pub mod dns_direction {
    /// A query the workload sent (UDP to port 53).
    pub const QUERY: u32 = 1;
    /// An answer the workload received (UDP from port 53).
    pub const ANSWER: u32 = 2;
}

/// A DNS packet of a gated workload (`cgroup_skb` programs). Addresses are
/// IPv4-mapped IPv6 for IPv4 (`::ffff:a.b.c.d`), network order; ports host
/// order. `seq` is, for an answer, the workload's `DNS_RECEIVED` count
/// after it: user space writes it into `DNS_PROCESSED` once processed.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DnsEvent {
    /// [`EVENT_DNS_PACKET`].
    pub kind: u32,
    /// [`dns_direction`].
    pub direction: u32,
    /// cgroup v2 id of the socket.
    pub cgroup_id: u64,
    pub seq: u64,
    /// `bpf_ktime_get_boot_ns` when the packet passed.
    pub ktime_ns: u64,
    /// The socket's cgroup's policy (`GATED_CGROUPS`), `u32::MAX` if none.
    pub policy_id: u32,
    /// Bytes of `payload` used.
    pub len: u32,
    pub src: [u8; 16],
    pub dst: [u8; 16],
    pub sport: u16,
    pub dport: u16,
    pub _pad: u32,
    pub payload: [u8; DNS_PAYLOAD_LEN],
}

/// Key of `HOST_RULES`: a workload (cgroup) and an address it resolved
/// (IPv4 as `::ffff:a.b.c.d`, network order).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct HostKey {
    pub cgroup_id: u64,
    pub addr: [u8; 16],
}

/// Value of `HOST_RULES`: the port rules the policy's host rules give the
/// names the workload resolved to this address (merged by user space, the
/// strictest action per port), valid until `expires_ns`
/// (`bpf_ktime_get_boot_ns`): the earliest end of those names' TTLs. After
/// it the kernel asks user space to refresh the entry ([`EVENT_DNS_WAIT`])
/// rather than decide with a stale one.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct HostRules {
    pub expires_ns: u64,
    pub rules: PortRules,
}

/// Value bits of `PROTECTED_INODES`: what a gated task may not do to one of
/// gatekeep's files or directories (by identity).
pub mod protected_inode {
    /// The inode itself: no open for writing, no truncate, setattr, rename,
    /// unlink or new hard link.
    pub const NO_WRITE: u32 = 1;
    /// The inode itself: no open for reading (a secret).
    pub const NO_READ: u32 = 2;
    /// A directory: no entry is created, removed, renamed or linked in it.
    pub const DIR_LOCKED: u32 = 4;
    /// A directory: every file directly inside is [`NO_WRITE`] (also files
    /// the agent creates later, e.g. a grants file replaced by rename).
    pub const CHILDREN_NO_WRITE: u32 = 8;
    /// A directory: every file directly inside is [`NO_READ`].
    pub const CHILDREN_NO_READ: u32 = 16;
}

/// Key of `PROTECTED_INODES`: a file's identity, like an exec rule's.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct InodeKey {
    /// `super_block::s_dev` in the kernel's encoding.
    pub dev: u64,
    pub ino: u64,
}

/// Self-protection (issue 18): what gated tasks may never do to gatekeep or
/// the kernel, unless their policy relaxes it.
///
/// Each protection has an id; the refusals of a protection are counted per
/// (id, cgroup) in `PROTECT_DENIALS`, and a policy relaxes a protection by
/// setting bit `1 << id` of its `PROTECT_RELAXED` word. Ids 1..=15 are the
/// process/kernel protections; 16..=31 are reserved for the file and cgroup
/// protections. Append, never renumber: the ids are in audit records.
pub mod protect {
    /// Signals (`kill`, `tgkill`, `pidfd_send_signal`, `sigqueue`) to a
    /// protected process (`task_kill`).
    pub const SIGNAL: u32 = 1;
    /// ptrace and everything `ptrace_may_access` guards (`/proc/<pid>/mem`,
    /// `environ`, `maps`, `process_vm_readv`, `pidfd_getfd`) on a protected
    /// process (`ptrace_access_check`).
    pub const PTRACE: u32 = 2;
    /// The `bpf()` system call (`bpf`).
    pub const BPF: u32 = 3;
    /// Module loading, module auto-loading requests, kexec and loading IMA
    /// policies or keys (`kernel_load_data`, `kernel_read_file`,
    /// `kernel_module_request`); firmware loads are left alone.
    pub const KERNEL: u32 = 4;
    /// Opening a block device, `/dev/mem`, `/dev/kmem`, `/dev/port` or
    /// `/proc/kcore` (`file_open`).
    pub const RAW_DEVICE: u32 = 5;
    /// `mount`, `umount`, `move_mount`, `pivot_root`, remounts
    /// (`sb_mount`, `sb_umount`, `move_mount`, `sb_pivotroot`, `sb_remount`).
    pub const MOUNT: u32 = 6;
    /// `connect` to a listener of the decision service (`socket_connect`).
    pub const SERVICE_CONNECT: u32 = 7;
    /// gatekeep's files by identity (config, policies, state, audit, pins,
    /// binaries).
    pub const FILES: u32 = 16;
    /// Leaving the gated subtree (cgroup file writes outside it,
    /// `clone3(CLONE_INTO_CGROUP)`, renaming cgroups).
    pub const CGROUPS: u32 = 17;
    /// One past the highest id of the process and kernel protections.
    pub const END: u32 = 8;
    // Ids 16..=31 belong to the file and cgroup protections.
    const _: () = assert!(END <= 16);

    /// The `PROTECT_RELAXED` bit of protection `id` (ids are below 32).
    #[must_use]
    #[inline]
    pub const fn bit(id: u32) -> u32 {
        1 << (id & 31)
    }
}

/// Value of the `PROTECTED_TASKS` map (keyed by thread group id): a process
/// of gatekeep's that gated tasks may not signal or trace.
///
/// The start time tells a reused pid from the process itself: it is the
/// process's `start_boottime` in clock ticks (`USER_HZ`), the unit of field
/// 22 of `/proc/<pid>/stat`, from which the agent reads it.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ProtectedTask {
    pub start_ticks: u64,
}

/// Nanoseconds per clock tick (`USER_HZ` = 100 on every architecture
/// gatekeep runs on): the kernel divides `start_boottime` by it to compare
/// with [`ProtectedTask::start_ticks`].
pub const NS_PER_CLOCK_TICK: u64 = 10_000_000;

/// Key of the `PROTECT_DENIALS` map: refused self-protection attempts are
/// counted per protection and cgroup, so a flood costs one map entry, and
/// user space writes one audit record per burst.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct ProtectDenialKey {
    /// A [`protect`] id.
    pub hook: u32,
    pub _pad: u32,
    pub cgroup_id: u64,
}

/// Key of the `SERVICE_LISTENERS` map: an address and port the decision
/// service listens on. `addr` is all zeroes for a wildcard listener, which
/// the kernel matches for loopback destinations; the agent adds the host's
/// own addresses as exact keys.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct ServiceListenerKey {
    /// `AF_INET` or `AF_INET6` (IPv4-mapped IPv6 is keyed as IPv4).
    pub family: u16,
    /// Host byte order.
    pub port: u16,
    pub _pad: u32,
    /// IPv4 in the first 4 bytes, or IPv6; network order.
    pub addr: [u8; 16],
}

#[cfg(feature = "user")]
mod pod {
    // SAFETY (all): `#[repr(C)]` plain-old-data with explicit padding and
    // no invalid bit patterns.
    unsafe impl aya::Pod for super::GatedCgroup {}
    unsafe impl aya::Pod for super::PolicyDefaults {}
    unsafe impl aya::Pod for super::ExecRuleKey {}
    unsafe impl aya::Pod for super::ExecRule {}
    unsafe impl aya::Pod for super::BoundEnv {}
    unsafe impl aya::Pod for super::ContentVersion {}
    unsafe impl aya::Pod for super::PortRule {}
    unsafe impl aya::Pod for super::PortRules {}
    unsafe impl aya::Pod for super::ConnectV4Key {}
    unsafe impl aya::Pod for super::ConnectV6Key {}
    unsafe impl aya::Pod for super::UnixRuleKey {}
    unsafe impl aya::Pod for super::PendingRequest {}
    unsafe impl aya::Pod for super::VerdictKey {}
    unsafe impl aya::Pod for super::Verdict {}
    unsafe impl aya::Pod for super::KernelOffsets {}
    unsafe impl aya::Pod for super::GrantKey {}
    unsafe impl aya::Pod for super::Grant {}
    unsafe impl aya::Pod for super::ProtectedTask {}
    unsafe impl aya::Pod for super::ProtectDenialKey {}
    unsafe impl aya::Pod for super::ServiceListenerKey {}
    unsafe impl aya::Pod for super::InodeKey {}
    unsafe impl aya::Pod for super::HostKey {}
    unsafe impl aya::Pod for super::HostRules {}
}

#[cfg(test)]
mod tests {
    use core::mem::{align_of, size_of};

    use super::*;

    #[test]
    fn until_nul_keeps_the_bytes_before_the_first_nul() {
        let word = |bytes: [u8; 8]| u64::from_le_bytes(bytes);
        assert_eq!(until_nul(word(*b"abcdefgh")), (word(*b"abcdefgh"), false));
        assert_eq!(
            until_nul(word(*b"abc\0efgh")),
            (word(*b"abc\0\0\0\0\0"), true)
        );
        assert_eq!(until_nul(word(*b"\0bcdefgh")), (0, true));
        // A 0x01 after the NUL borrows in the test; the first NUL still wins.
        assert_eq!(
            until_nul(word([b'a', 0, 1, 0, 0x80, 0xff, 1, 1])),
            (word([b'a', 0, 0, 0, 0, 0, 0, 0]), true)
        );
        assert_eq!(
            until_nul(word([0xff, 0x80, 0x01, 0x7f, 0xfe, 1, 2, 0])),
            (word([0xff, 0x80, 0x01, 0x7f, 0xfe, 1, 2, 0]), true)
        );
    }

    #[test]
    fn unix_rule_hashes_name_what_the_kernel_resolves() {
        let path = unix_rule_hash(b"/run/docker.sock");
        // What follows a pathname's NUL is not part of it.
        assert_eq!(path, unix_rule_hash(b"/run/docker.sock\0"));
        assert_eq!(path, unix_rule_hash(b"/run/docker.sock\0garbage"));
        let mut full = [0u8; 120];
        full[..16].copy_from_slice(b"/run/docker.sock");
        assert_eq!(path, unix_rule_hash(&full), "cut at 108 bytes");
        assert_ne!(path, unix_rule_hash(b"/run/docker.sockx"));
        assert_ne!(path, unix_rule_hash(b"/run/docker.soc"));
        // An abstract name is all its bytes, trailing NULs included.
        let abstract_name = unix_rule_hash(b"\0name");
        assert_ne!(abstract_name, unix_rule_hash(b"\0name\0"));
        assert_ne!(abstract_name, unix_rule_hash(b"\0nam"));
        assert_ne!(abstract_name, unix_rule_hash(b"name"));
        assert_ne!(unix_rule_hash(b"\0a\0b"), unix_rule_hash(b"\0a\0c"));
    }

    /// The kernel and user space must agree on these sizes; a change here is
    /// a wire-format change.
    #[test]
    fn gated_filter_slots_cover_every_id_within_the_array() {
        assert!(GATED_FILTER_SLOTS.is_power_of_two());
        assert_eq!(gated_filter_slot(0), 0);
        assert_eq!(gated_filter_slot(1), 1);
        assert_eq!(gated_filter_slot(u64::from(GATED_FILTER_SLOTS)), 0);
        assert_eq!(gated_filter_slot(u64::MAX), GATED_FILTER_SLOTS - 1);
    }

    #[test]
    fn pending_slots_cover_every_tid_within_the_array() {
        assert!(PENDING_SLOTS.is_power_of_two());
        assert_eq!(pending_slot(7), 7);
        assert_eq!(pending_slot(PENDING_SLOTS + 7), 7);
        assert_eq!(pending_slot(u32::MAX), PENDING_SLOTS - 1);
    }

    #[test]
    fn layouts_have_no_implicit_padding() {
        assert_eq!(size_of::<GatedCgroup>(), 8);
        assert_eq!(size_of::<PolicyDefaults>(), 40);
        assert_eq!(size_of::<ExecRuleKey>(), 24);
        assert_eq!(size_of::<ContentVersion>(), 24);
        assert_eq!(size_of::<ExecRule>(), 32);
        assert_eq!(
            size_of::<ExecRuleStaleEvent>(),
            size_of::<EventHeader>() + 16 + 2 * 24 + 16
        );
        assert_eq!(size_of::<PortRules>(), 8 * PORT_RULES);
        assert_eq!(size_of::<ConnectV4Key>(), 8);
        assert_eq!(size_of::<ConnectV6Key>(), 20);
        assert_eq!(size_of::<HostKey>(), 24);
        assert_eq!(size_of::<HostRules>(), 8 + 8 * PORT_RULES);
        assert_eq!(size_of::<DnsEvent>(), 4 * 8 + 8 + 32 + 8 + DNS_PAYLOAD_LEN);
        assert_eq!(size_of::<PendingRequest>(), 40);
        assert_eq!(size_of::<VerdictKey>(), 24);
        assert_eq!(size_of::<Verdict>(), 16);
        assert_eq!(size_of::<GrantKey>(), 24);
        assert_eq!(size_of::<Grant>(), 16);
        assert_eq!(size_of::<InodeKey>(), 16);
        assert_eq!(size_of::<ProtectDenialKey>(), 16);
        assert_eq!(size_of::<EventHeader>(), 4 * 8 + 8 * 3 + COMM_LEN);
        assert_eq!(
            size_of::<ExecEvent>(),
            size_of::<EventHeader>() + 16 + 24 + 24 + PATH_LEN + ARGV_LEN + 8 + ENV_LEN
        );
        assert_eq!(
            size_of::<BoundEnv>(),
            8 + 2 * BOUND_ENV_NAMES * BOUND_ENV_NAME_LEN
        );
        assert_eq!(
            size_of::<ConnectEvent>(),
            size_of::<EventHeader>() + 16 + 16 + 108 + 4
        );
        assert_eq!(align_of::<ExecEvent>(), 8);
    }

    #[test]
    fn bound_env_names_match_their_name_and_equals_sign_only() {
        let bound = BoundEnv::from_names(&[b"PYTHONPATH", b"NODE_OPTIONS"]).expect("valid");
        assert_eq!(bound.count, 2);
        // What the kernel does with an entry's first 32 bytes, zero padded.
        let matches = |entry: &[u8]| {
            let mut head = [0u8; BOUND_ENV_NAME_LEN];
            let n = entry.len().min(BOUND_ENV_NAME_LEN - 1);
            head[..n].copy_from_slice(&entry[..n]);
            (0..bound.count as usize).any(|i| {
                (0..BOUND_ENV_NAME_LEN / 8).all(|w| {
                    let mut word = [0u8; 8];
                    word.copy_from_slice(&head[w * 8..w * 8 + 8]);
                    u64::from_le_bytes(word) & bound.masks[i][w] == bound.names[i][w]
                })
            })
        };
        assert!(matches(b"PYTHONPATH=/x"));
        assert!(matches(b"PYTHONPATH="));
        assert!(matches(b"NODE_OPTIONS=--require /tmp/x.js"));
        assert!(!matches(b"PYTHONPATHX=/x"));
        assert!(!matches(b"PYTHONPATH"));
        assert!(!matches(b"XPYTHONPATH=/x"));
        assert!(!matches(b"NODE_OPTION=x"));
        assert!(BoundEnv::from_names(&[b"A=B"]).is_none());
        assert!(BoundEnv::from_names(&[b""]).is_none());
        assert!(BoundEnv::from_names(&[&[b'A'; 31]]).is_some());
        assert!(BoundEnv::from_names(&[&[b'A'; 32]]).is_none());
        assert!(BoundEnv::from_names(&[b"A".as_slice(); 9]).is_none());
    }

    #[test]
    fn protect_types_have_their_wire_sizes_and_ids_fit_the_relax_mask() {
        assert_eq!(size_of::<ProtectedTask>(), 8);
        assert_eq!(size_of::<ProtectDenialKey>(), 16);
        assert_eq!(size_of::<ServiceListenerKey>(), 24);
        // 42 `u32` offsets: the exec/connect ones, the self-protection ones,
        // the egress ones, the content version ones, the mapping ones, then
        // the new image's argv.
        assert_eq!(size_of::<KernelOffsets>(), 43 * 4);
        assert_eq!(size_of::<InodeKey>(), 16);
        let ids = [
            protect::SIGNAL,
            protect::PTRACE,
            protect::BPF,
            protect::KERNEL,
            protect::RAW_DEVICE,
            protect::MOUNT,
            protect::SERVICE_CONNECT,
            protect::FILES,
            protect::CGROUPS,
        ];
        let mask = ids.iter().fold(0u32, |mask, id| {
            assert_eq!(mask & protect::bit(*id), 0, "id {id} is used twice");
            mask | protect::bit(*id)
        });
        assert_eq!(mask.count_ones() as usize, ids.len());
    }

    #[test]
    fn actions_are_distinct_and_none_is_zero() {
        assert_eq!(action::NONE, 0);
        let all = [action::ALLOW, action::DENY, action::ASK];
        assert!(all.iter().all(|a| *a != action::NONE));
        assert!(all[0] != all[1] && all[1] != all[2] && all[0] != all[2]);
    }
}
