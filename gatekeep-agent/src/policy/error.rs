//! The errors of compiling and applying policies: their own module, below
//! both [`crate::policy`] and the hooks that compile into it.

use ipnet::IpNet;

/// Errors compiling or applying policies.
#[derive(Debug, thiserror::Error)]
pub enum PolicyMapsError {
    #[error(
        "policy set has {count} policies; at most {max} fit while the previous set is still loaded"
    )]
    TooManyPolicies { count: usize, max: usize },
    #[error(
        "policy `{policy}`: network {net} is covered by {count} port rules (its own and those of wider networks), the kernel holds at most {max}"
    )]
    TooManyPortRules {
        policy: String,
        net: IpNet,
        count: usize,
        max: usize,
    },
    #[error(
        "policy `{policy}`: exec.bound_env cannot be bound in the kernel (at most 8 names of at most 31 bytes, no `=`); fix the policy"
    )]
    BoundEnv { policy: String },
    #[error("failed to read kernel map `{map}`")]
    Read {
        map: &'static str,
        #[source]
        source: aya::maps::MapError,
    },
    #[error("failed to update kernel map `{map}`")]
    Write {
        map: &'static str,
        #[source]
        source: aya::maps::MapError,
    },
    #[error("failed to write policy maps; the previous policy stays in force")]
    RolledBack {
        #[source]
        source: Box<PolicyMapsError>,
    },
}
