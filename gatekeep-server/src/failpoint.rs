//! Test-only fault injection: a debug build (what `cargo test` runs as the replicas of the
//! multi-replica tests) aborts its process at a named point when the environment variable
//! [`VARIABLE`] names that point, so a test can kill a replica exactly between two steps
//! (e.g. a decision's commit and its audit record's). Release builds compile it to nothing
//! and never read the variable; it is not a setting, and nothing but a test should set it.

/// The variable a test sets to the name of the point to abort at.
pub const VARIABLE: &str = "GATEKEEP_TEST_ABORT_AT";

/// A reviewer's decision, a cancellation, a withdrawal or an expiry was committed to the
/// store; its audit records are not queued yet.
pub const DECISION_STORED: &str = "decision-stored";

/// A request decided without a reviewer (a server rule, a standing grant) was stored; its
/// outcome's record is not queued yet.
pub const AUTOMATIC_DECISION_STORED: &str = "automatic-decision-stored";

/// Aborts the process (as a SIGKILL would stop it: nothing flushed, no destructor run) when
/// [`VARIABLE`] names `point`. Debug builds only.
#[cfg(debug_assertions)]
pub fn hit(point: &str) {
    static ARMED: std::sync::OnceLock<Option<String>> = std::sync::OnceLock::new();
    let armed = ARMED.get_or_init(|| std::env::var(VARIABLE).ok());
    if armed.as_deref() == Some(point) {
        eprintln!("{VARIABLE}={point}: aborting here, as the test asked");
        std::process::abort();
    }
}

/// Release builds: nothing.
#[cfg(not(debug_assertions))]
#[inline(always)]
pub fn hit(_point: &str) {}
