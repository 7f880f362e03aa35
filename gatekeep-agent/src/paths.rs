//! Every default path the agent uses, in one place. The config file and
//! command-line flags override them; tests pass temporary ones.

/// The agent's configuration file.
pub const CONFIG_FILE: &str = "/etc/gatekeep/agent.toml";
/// Folder of policy files (`*.toml`).
pub const POLICY_DIR: &str = "/etc/gatekeep/policies";
/// The agent's state: granted durations (`grants.json`) and, in the
/// embedded mode, the decision service's data, CA and reviewer token.
pub const STATE_DIR: &str = "/var/lib/gatekeep";
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

/// Granted durations the agent installed, in the state folder: the kernel
/// map holds only digests, this file says which grant each one is.
pub const GRANTS_FILE: &str = "grants.json";
/// The embedded decision service's data (`state.db`, `audit.db`), in the
/// state folder.
pub const EMBEDDED_SERVICE_SUBDIR: &str = "service";
/// The embedded decision service's CA and certificate, in the state folder;
/// kept across restarts so reviewers' copies of `ca.pem` stay valid.
pub const EMBEDDED_PKI_SUBDIR: &str = "pki";
/// The bootstrap reviewer's token (mode 0600), in the state folder.
pub const REVIEWER_TOKEN_FILE: &str = "reviewer.token";
/// A `gatekeep` CLI config (server, token, CA) for the bootstrap reviewer
/// (mode 0600), in the state folder: `GATEKEEP_CLI_CONFIG=<this> gatekeep ...`.
pub const CLI_CONFIG_FILE: &str = "cli.toml";
/// The bootstrap reviewer the embedded service creates.
pub const BOOTSTRAP_REVIEWER: &str = "admin";
/// The embedded decision service's port on 127.0.0.1.
pub const EMBEDDED_PORT: u16 = 7443;
