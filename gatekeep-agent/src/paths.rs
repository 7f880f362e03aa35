//! Every default path the agent uses, in one place. The config file and
//! command-line flags override them; tests pass temporary ones.

/// The agent's configuration file.
pub const CONFIG_FILE: &str = "/etc/gatekeep/agent.toml";
/// Folder of policy files (`*.toml`).
pub const POLICY_DIR: &str = "/etc/gatekeep/policies";
/// The local hash-chained audit log (`SQLite`).
pub const AUDIT_DB: &str = "/var/lib/gatekeep/audit.db";
/// Where programs (links) and maps are pinned in bpffs, so a restarted agent
/// adopts them and enforcement never lapses.
pub const PIN_DIR: &str = "/sys/fs/bpf/gatekeep";
/// Root of the cgroup v2 hierarchy.
pub const CGROUP_ROOT: &str = "/sys/fs/cgroup";
/// procfs, for enrichment and the pause protocol.
pub const PROC: &str = "/proc";
/// User names for enrichment.
pub const PASSWD: &str = "/etc/passwd";

/// Sub-folder of the pin directory holding one pinned link per program.
pub const LINKS_SUBDIR: &str = "links";
/// Sub-folder of the pin directory holding one pinned map per shared map.
pub const MAPS_SUBDIR: &str = "maps";
