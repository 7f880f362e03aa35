//! Size limits of every field the service accepts. A message over a limit is refused with
//! `INVALID_ARGUMENT` and changes nothing.

use time::Duration;

/// Longest id (a UUID is 36 characters; the braced and URN forms are a little longer).
pub const MAX_ID: usize = 64;
/// Longest name: policy, rule, host, user, reviewer, group, duration.
pub const MAX_NAME: usize = 256;
/// Most host names a connect request carries (`ConnectTarget::resolved`).
pub const MAX_RESOLVED: usize = 16;
/// Most bytes of a DNS name.
pub const MAX_HOST_NAME: usize = 253;
/// Longest path: executable, cwd, cgroup, socket path.
pub const MAX_PATH: usize = 4096;
/// Most argv items (of the request and of each ancestor).
pub const MAX_ARGS: usize = 256;
/// Longest single argument.
pub const MAX_ARG: usize = 4096;
/// Most argv bytes in total.
pub const MAX_ARGV_BYTES: usize = 32 * 1024;
/// Most ancestors.
pub const MAX_ANCESTRY: usize = 32;
/// Most reviewer groups, owners or grant durations.
pub const MAX_GROUPS: usize = 64;
/// Largest `approvals_required`.
pub const MAX_APPROVALS: u32 = 100;
/// Longest reason.
pub const MAX_REASON: usize = 2048;
/// Longest wait a request can ask for (the policy's maximum timeout).
pub const MAX_TIMEOUT: Duration = Duration::hours(24);
/// Largest gRPC message the service decodes.
pub const MAX_MESSAGE_BYTES: usize = 1024 * 1024;
