//! One module per kernel hook (Tetragon calls it a sensor): everything the
//! agent knows about a hook sits in `hooks/<hook>.rs`, behind [`Hook`]:
//!
//! - the request the hook reports on the ring buffer, and how to parse it;
//! - how a policy compiles into the hook's rule maps (and its defaults in
//!   the shared `POLICIES` entry);
//! - how to read and write those maps (the hook knows their key and value
//!   types; everyone else sees encoded [`RuleKey`]s and values);
//! - how a reviewer reads a request: the rule that asked, the typed target
//!   put to the decider, the audit payload's fields.
//!
//! Its kernel half is `gatekeep-ebpf/src/hooks/<hook>.rs` (the program and
//! the maps only it uses); the request's digest is computed there, and the
//! agent only carries it. Adding a hook adds those two modules and one line
//! in [`hooks!`] below. The shared parts a hook extends with a new field or
//! variant are the kernel ABI in `gatekeep-common` (its event struct, its
//! `PolicyDefaults` field) and the request model in `gatekeep-proto` (the
//! wire form of what reviewers see).

pub mod connect;
pub mod exec;
// Self-protection of gatekeep's files (issue 18, item 3): no requests of its own, so not a
// `Hook`; it compiles into `PROTECTED_INODES` through `policy::HostView::protected`.
pub mod protect_files;

use std::{collections::BTreeMap, fmt::Debug};

use aya::maps::{Map, MapError};
use gatekeep_common::{PolicyDefaults, action};
use gatekeep_policy::{Action, Policy};
use gatekeep_proto::{audit::KernelFacts, model};

use crate::{
    bpf::record::{Origin, ParseError},
    pause::enrich::Enricher,
    policy::error::PolicyMapsError,
};

/// One kernel hook, as the agent sees it.
pub trait Hook {
    /// The hook's name in logs, audit records and requests (`"exec"`).
    const NAME: &'static str;
    /// The request model's kind of its requests.
    const MODEL_KIND: model::Kind;
    /// The [`gatekeep_common::request_kind`] of its paused requests.
    const KIND: u32;
    /// Its ring buffer records: a request paused to ask, and one the kernel
    /// denied by rule ([`gatekeep_common::event_kind`], and a log name).
    const ASK: (u32, &'static str);
    const DENIED: (u32, &'static str);
    /// Its record of what a policy in audit mode let through that enforcement would have
    /// denied or asked about.
    const AUDITED: (u32, &'static str);
    /// The maps policy compiles into ([`gatekeep_common::map_names`]).
    const RULE_MAPS: &'static [&'static str];

    /// A request as the kernel reported it.
    type Request: Debug + Clone + PartialEq + Eq + Send + Sync + 'static;
    /// What compiling a policy leaves for [`Hook::rule`] (e.g. which rule
    /// path a file identity came from).
    type Loaded: Debug + Clone + Default + Send + Sync + 'static;

    /// Parses one of its ring buffer records ([`Hook::ASK`], [`Hook::DENIED`] or
    /// [`Hook::AUDITED`]).
    fn parse(kind: u32, bytes: &[u8]) -> Result<Self::Request, ParseError>;
    /// The [`gatekeep_common::action`] one of its records carries: for [`Hook::AUDITED`],
    /// what enforcement would have done.
    fn reported_action(kind: u32, bytes: &[u8]) -> Result<u32, ParseError>;
    fn origin(request: &Self::Request) -> &Origin;

    /// Compiles `policy`'s part for this hook: its defaults, and its rules
    /// as entries of [`Hook::RULE_MAPS`].
    fn compile(
        policy: &Policy,
        out: &mut Compiling<'_>,
        loaded: &mut Self::Loaded,
    ) -> Result<(), PolicyMapsError>;
    /// Every entry of one of its maps, encoded.
    fn read_map(name: &'static str, map: &Map) -> Result<Vec<(RuleKey, Vec<u8>)>, MapError>;
    /// Writes (`Some`) or removes (`None`) one entry of one of its maps.
    fn write_map(map: &mut Map, key: &RuleKey, value: Option<&[u8]>) -> Result<(), MapError>;

    /// The policy's rule (or default) that decided `request`, for reviewers.
    fn rule(policy: &Policy, loaded: &Self::Loaded, request: &Self::Request) -> String;
    /// What is asked, in the request model (what reviewers and both audit logs see).
    fn target(request: &Self::Request, enricher: &Enricher) -> model::Target;
    /// What tells identical kernel denials apart (aggregated one record per burst): by
    /// default the target; a hook whose target is costly to describe gives what the kernel
    /// reported instead, as every denial of a flood pays for it.
    fn burst_key(request: &Self::Request, enricher: &Enricher) -> String {
        serde_json::to_string(&Self::target(request, enricher)).unwrap_or_default()
    }
    /// What the kernel reported beyond the target (for the agent's audit log).
    fn kernel_facts(request: &Self::Request) -> KernelFacts;
    /// Why the kernel denied `request` when it was not a deny rule: a `reason`
    /// code and its explanation for the `kernel_denied` record.
    fn denied_because(_request: &Self::Request) -> Option<(&'static str, &'static str)> {
        None
    }
}

/// What a hook's ring buffer record reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reported {
    /// A request paused for a decision.
    Ask,
    /// A request the kernel denied by rule.
    Denied,
    /// A request a policy in audit mode let through; `would` is the
    /// [`gatekeep_common::action`] enforcement would have taken.
    Audited { would: u32 },
}

/// One entry of a hook's rule map, in the hook's own encoding (ordered, so
/// that states compare and diff as plain maps).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct RuleKey {
    /// [`gatekeep_common::map_names`].
    pub map: &'static str,
    /// The policy the entry belongs to.
    pub policy_id: u32,
    /// The rest of the key, encoded by the hook.
    pub key: Vec<u8>,
}

/// Where [`Hook::compile`] writes one policy's part.
pub struct Compiling<'a> {
    /// The policy's kernel id.
    pub id: u32,
    /// Its `POLICIES` entry.
    pub defaults: &'a mut PolicyDefaults,
    /// Rule map entries, for every hook.
    pub rules: &'a mut BTreeMap<RuleKey, Vec<u8>>,
    /// Problems that do not stop the load.
    pub warnings: &'a mut Vec<String>,
}

/// Declares the registered hooks: `field: Variant => Type`. Generates
/// [`Request`] (one variant per hook), [`Loaded`] (one field per hook) and
/// the dispatch from raw kinds and map names to the hook that owns them.
macro_rules! hooks {
    ($($field:ident: $variant:ident => $hook:ty),+ $(,)?) => {
        /// A request of any hook.
        #[derive(Debug, Clone, PartialEq, Eq)]
        pub enum Request {
            $($variant(<$hook as Hook>::Request),)+
        }

        /// What compiling a policy left, per hook.
        #[derive(Debug, Clone, Default)]
        pub struct Loaded {
            $(pub $field: <$hook as Hook>::Loaded,)+
        }

        /// Every map some hook compiles policy into.
        pub const RULE_MAPS: &[&str] = {
            const COUNT: usize = 0 $(+ <$hook as Hook>::RULE_MAPS.len())+;
            const ALL: [&str; COUNT] = {
                let mut all = [""; COUNT];
                let mut at = 0;
                $(
                    let mut i = 0;
                    while i < <$hook as Hook>::RULE_MAPS.len() {
                        all[at] = <$hook as Hook>::RULE_MAPS[i];
                        at += 1;
                        i += 1;
                    }
                )+
                all
            };
            &ALL
        };

        impl Request {
            #[must_use]
            pub fn origin(&self) -> &Origin {
                match self {
                    $(Request::$variant(request) => <$hook as Hook>::origin(request),)+
                }
            }

            /// The hook's name (`"exec"`).
            #[must_use]
            pub fn kind_name(&self) -> &'static str {
                match self {
                    $(Request::$variant(_) => <$hook as Hook>::NAME,)+
                }
            }

            /// [`gatekeep_common::request_kind`].
            #[must_use]
            pub fn kind(&self) -> u32 {
                match self {
                    $(Request::$variant(_) => <$hook as Hook>::KIND,)+
                }
            }

            /// The log name of its record (`"exec_ask"`).
            #[must_use]
            pub fn event_name(&self, reported: Reported) -> &'static str {
                match self {
                    $(Request::$variant(_) => match reported {
                        Reported::Ask => <$hook as Hook>::ASK.1,
                        Reported::Denied => <$hook as Hook>::DENIED.1,
                        Reported::Audited { .. } => <$hook as Hook>::AUDITED.1,
                    },)+
                }
            }

            /// [`Hook::rule`].
            #[must_use]
            pub fn rule(&self, policy: &Policy, loaded: &Loaded) -> String {
                match self {
                    $(Request::$variant(request) => {
                        <$hook as Hook>::rule(policy, &loaded.$field, request)
                    })+
                }
            }

            /// [`Hook::target`].
            #[must_use]
            pub fn target(&self, enricher: &Enricher) -> model::Target {
                match self {
                    $(Request::$variant(request) => <$hook as Hook>::target(request, enricher),)+
                }
            }

            /// [`Hook::burst_key`].
            #[must_use]
            pub fn burst_key(&self, enricher: &Enricher) -> String {
                match self {
                    $(Request::$variant(request) => <$hook as Hook>::burst_key(request, enricher),)+
                }
            }

            /// [`Hook::kernel_facts`].
            #[must_use]
            pub fn kernel_facts(&self) -> KernelFacts {
                match self {
                    $(Request::$variant(request) => <$hook as Hook>::kernel_facts(request),)+
                }
            }

            /// [`Hook::denied_because`].
            #[must_use]
            pub fn denied_because(&self) -> Option<(&'static str, &'static str)> {
                match self {
                    $(Request::$variant(request) => <$hook as Hook>::denied_because(request),)+
                }
            }

            /// [`Hook::MODEL_KIND`].
            #[must_use]
            pub fn model_kind(&self) -> model::Kind {
                match self {
                    $(Request::$variant(_) => <$hook as Hook>::MODEL_KIND,)+
                }
            }
        }

        /// Parses a hook's record: `None` if no hook writes records of `kind`,
        /// else what it reports, and the request.
        #[must_use]
        pub fn parse(kind: u32, bytes: &[u8]) -> Option<Result<(Reported, Request), ParseError>> {
            $(
                let reported = if kind == <$hook as Hook>::ASK.0 {
                    Some(Ok(Reported::Ask))
                } else if kind == <$hook as Hook>::DENIED.0 {
                    Some(Ok(Reported::Denied))
                } else if kind == <$hook as Hook>::AUDITED.0 {
                    Some(<$hook as Hook>::reported_action(kind, bytes)
                        .map(|would| Reported::Audited { would }))
                } else {
                    None
                };
                if let Some(reported) = reported {
                    return Some(reported.and_then(|reported| {
                        <$hook as Hook>::parse(kind, bytes)
                            .map(|request| (reported, Request::$variant(request)))
                    }));
                }
            )+
            None
        }

        /// The name of the hook whose requests are of `kind`.
        #[must_use]
        pub fn kind_name(kind: u32) -> Option<&'static str> {
            $(
                if kind == <$hook as Hook>::KIND {
                    return Some(<$hook as Hook>::NAME);
                }
            )+
            None
        }

        /// The request model's kind of the hook whose requests are of `kind`.
        #[must_use]
        pub fn model_kind(kind: u32) -> Option<model::Kind> {
            $(
                if kind == <$hook as Hook>::KIND {
                    return Some(<$hook as Hook>::MODEL_KIND);
                }
            )+
            None
        }

        /// Compiles `policy` for every hook.
        pub fn compile(
            policy: &Policy,
            out: &mut Compiling<'_>,
            loaded: &mut Loaded,
        ) -> Result<(), PolicyMapsError> {
            $(<$hook as Hook>::compile(policy, out, &mut loaded.$field)?;)+
            Ok(())
        }

        /// [`Hook::read_map`] of the hook owning `name`.
        pub fn read_map(name: &'static str, map: &Map) -> Result<Vec<(RuleKey, Vec<u8>)>, MapError> {
            $(
                if <$hook as Hook>::RULE_MAPS.contains(&name) {
                    return <$hook as Hook>::read_map(name, map);
                }
            )+
            Err(not_a_rule_map(name))
        }

        /// [`Hook::write_map`] of the hook owning `key.map`.
        pub fn write_map(map: &mut Map, key: &RuleKey, value: Option<&[u8]>) -> Result<(), MapError> {
            $(
                if <$hook as Hook>::RULE_MAPS.contains(&key.map) {
                    return <$hook as Hook>::write_map(map, key, value);
                }
            )+
            Err(not_a_rule_map(key.map))
        }
    };
}

// The registration: one line per hook.
hooks! {
    exec: Exec => exec::Exec,
    connect: Connect => connect::Connect,
}

/// The kernel's encoding of a policy action.
#[must_use]
pub fn kernel_action(action: Action) -> u32 {
    match action {
        Action::Allow => action::ALLOW,
        Action::Deny => action::DENY,
        Action::Ask => action::ASK,
    }
}

/// No registered hook owns the map `name` (a programming error: every
/// [`RULE_MAPS`] entry has its hook).
fn not_a_rule_map(name: &str) -> MapError {
    MapError::InvalidName {
        name: name.to_owned(),
    }
}

/// `get`/`remove` of an absent key is `KeyNotFound`; for a rule map that is
/// "nothing to do".
pub(crate) fn absent_is_ok(result: Result<(), MapError>) -> Result<(), MapError> {
    match result {
        Err(MapError::KeyNotFound) => Ok(()),
        other => other,
    }
}

#[cfg(test)]
mod tests {
    use gatekeep_common::{event_kind, map_names, request_kind};

    use super::*;

    #[test]
    fn registered_hooks_own_their_kinds_and_maps() {
        assert_eq!(kind_name(request_kind::EXEC), Some("exec"));
        assert_eq!(kind_name(request_kind::CONNECT), Some("connect"));
        assert_eq!(kind_name(0), None);
        assert_eq!(
            RULE_MAPS,
            [
                map_names::EXEC_RULES,
                map_names::EXEC_BOUND_ENV,
                map_names::CONNECT_V4,
                map_names::CONNECT_V6,
                map_names::UNIX_RULES
            ]
        );
        assert!(RULE_MAPS.iter().all(|name| map_names::ALL.contains(name)));
        // A record of a kind no hook writes is not a hook's.
        assert!(parse(event_kind::ABANDONED, &[0; 64]).is_none());
        // A hook's record too short for its struct is refused, not read.
        assert!(matches!(
            parse(event_kind::EXEC_ASK, &[0; 8]),
            Some(Err(ParseError::Truncated { .. }))
        ));
    }
}
