//! Records from the kernel's `EVENTS` ring buffer: parsing raw bytes into
//! typed events (with size checks), and the async reader.
//!
//! Every record starts with a `u32` [`event_kind`]; the parser dispatches on
//! it (a hook's records to that hook's module in [`crate::hooks`]) and
//! refuses records shorter than their struct (a kernel/agent layout
//! mismatch, which must be loud rather than read garbage).

use gatekeep_common::{
    DnsEvent, EVENT_CGROUP_UNCLASSIFIED, EVENT_DNS_PACKET, EVENT_DNS_WAIT, EventHeader, TaskEvent,
    event_kind,
};

pub use super::record::{Origin, ParseError};
use super::record::{origin, read};
use crate::hooks::{self, Reported, Request};

/// What a request is about: a [`gatekeep_common::request_kind`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RequestKind(pub u32);

impl RequestKind {
    #[must_use]
    pub fn from_raw(raw: u32) -> Self {
        Self(raw)
    }

    /// The name of the hook that asks requests of this kind.
    #[must_use]
    pub fn as_str(self) -> &'static str {
        hooks::kind_name(self.0).unwrap_or("unknown")
    }
}

/// One ring-buffer record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// A request paused for a decision.
    Ask(Request),
    /// A request the kernel denied by rule.
    Denied(Request),
    /// A request a policy in audit mode let through; `would` is the
    /// [`gatekeep_common::action`] enforcement would have taken.
    Audited { request: Request, would: u32 },
    /// The task exited while its request was pending.
    Abandoned { origin: Origin, kind: RequestKind },
    /// The task kept re-entering without stopping (a tracer) and was refused.
    RefusedSpinning { origin: Origin, kind: RequestKind },
    /// A verdict was consumed by the restarted syscall.
    VerdictApplied {
        origin: Origin,
        kind: RequestKind,
        /// [`gatekeep_common::action`] applied.
        action: u32,
    },
    /// A task of an unclassified cgroup stopped until the agent classifies
    /// the cgroup and resumes it (`EVENT_CGROUP_UNCLASSIFIED`).
    Unclassified { origin: Origin, kind: RequestKind },
    /// An exec met a rule whose file was rewritten since the policy was
    /// loaded: the rule did not match (`EXEC_RULE_STALE`).
    ExecRuleStale(hooks::exec::StaleRule),
    /// An exec allowed by a verdict or grant was killed before its program
    /// ran: the argv the kernel gave it differs from the one allowed
    /// (`EXEC_ARGV_CHANGED`; the digest is the allowed request's).
    ArgvChanged { origin: Origin },
    /// The same for the bound environment (`EXEC_ENV_CHANGED`): the argv
    /// was the one allowed, the bound variables were not.
    EnvChanged { origin: Origin },
    /// A DNS datagram a gated workload sent or received
    /// (`EVENT_DNS_PACKET`), for [`crate::dns`]. `origin` names only the
    /// socket's cgroup.
    DnsPacket {
        origin: Origin,
        packet: Box<DnsEvent>,
    },
    /// A connect stopped until [`crate::dns`] has processed its workload's
    /// DNS answers (`EVENT_DNS_WAIT`).
    DnsWait { origin: Origin },
}

impl Event {
    #[must_use]
    pub fn origin(&self) -> &Origin {
        match self {
            Event::Ask(request) | Event::Denied(request) | Event::Audited { request, .. } => {
                request.origin()
            }
            Event::Abandoned { origin, .. }
            | Event::RefusedSpinning { origin, .. }
            | Event::VerdictApplied { origin, .. }
            | Event::Unclassified { origin, .. }
            | Event::ArgvChanged { origin }
            | Event::EnvChanged { origin }
            | Event::DnsPacket { origin, .. }
            | Event::DnsWait { origin } => origin,
            Event::ExecRuleStale(stale) => &stale.origin,
        }
    }

    /// A short name for logs.
    #[must_use]
    pub fn name(&self) -> &'static str {
        match self {
            Event::Ask(request) => request.event_name(Reported::Ask),
            Event::Denied(request) => request.event_name(Reported::Denied),
            Event::Audited { request, would } => {
                request.event_name(Reported::Audited { would: *would })
            }
            Event::Abandoned { .. } => "abandoned",
            Event::RefusedSpinning { .. } => "refused_spinning",
            Event::VerdictApplied { .. } => "verdict_applied",
            Event::Unclassified { .. } => "cgroup_unclassified",
            Event::ExecRuleStale(_) => "exec_rule_stale",
            Event::ArgvChanged { .. } => "exec_argv_changed",
            Event::EnvChanged { .. } => "exec_env_changed",
            Event::DnsPacket { .. } => "dns_packet",
            Event::DnsWait { .. } => "dns_wait",
        }
    }
}

/// Parses one ring-buffer record.
pub fn parse(bytes: &[u8]) -> Result<Event, ParseError> {
    if bytes.len() < size_of::<EventHeader>() {
        return Err(ParseError::TooShort { len: bytes.len() });
    }
    let kind = u32::from_ne_bytes([bytes[0], bytes[1], bytes[2], bytes[3]]);
    match kind {
        event_kind::ABANDONED | event_kind::REFUSED_SPINNING | event_kind::VERDICT_APPLIED => {
            let raw: TaskEvent = read(bytes, kind)?;
            let origin = origin(&raw.header);
            let request = RequestKind::from_raw(raw.request_kind);
            Ok(match kind {
                event_kind::ABANDONED => Event::Abandoned {
                    origin,
                    kind: request,
                },
                event_kind::REFUSED_SPINNING => Event::RefusedSpinning {
                    origin,
                    kind: request,
                },
                _ => Event::VerdictApplied {
                    origin,
                    kind: request,
                    action: raw.action,
                },
            })
        }
        event_kind::EXEC_ARGV_CHANGED => {
            let raw: TaskEvent = read(bytes, kind)?;
            Ok(Event::ArgvChanged {
                origin: origin(&raw.header),
            })
        }
        event_kind::EXEC_ENV_CHANGED => {
            let raw: TaskEvent = read(bytes, kind)?;
            Ok(Event::EnvChanged {
                origin: origin(&raw.header),
            })
        }
        EVENT_CGROUP_UNCLASSIFIED => {
            let raw: TaskEvent = read(bytes, kind)?;
            Ok(Event::Unclassified {
                origin: origin(&raw.header),
                kind: RequestKind::from_raw(raw.request_kind),
            })
        }
        event_kind::EXEC_RULE_STALE => hooks::exec::parse_stale(bytes).map(Event::ExecRuleStale),
        EVENT_DNS_PACKET => {
            let raw: DnsEvent = read(bytes, kind)?;
            let origin = Origin {
                policy_id: raw.policy_id,
                pid: 0,
                tid: 0,
                uid: 0,
                gid: 0,
                ppid: 0,
                cgroup_id: raw.cgroup_id,
                ktime_ns: raw.ktime_ns,
                digest: 0,
                comm: String::new(),
            };
            Ok(Event::DnsPacket {
                origin,
                packet: Box::new(raw),
            })
        }
        EVENT_DNS_WAIT => {
            let raw: TaskEvent = read(bytes, kind)?;
            Ok(Event::DnsWait {
                origin: origin(&raw.header),
            })
        }
        kind => match hooks::parse(kind, bytes) {
            Some(Ok((Reported::Ask, request))) => Ok(Event::Ask(request)),
            Some(Ok((Reported::Denied, request))) => Ok(Event::Denied(request)),
            Some(Ok((Reported::Audited { would }, request))) => {
                Ok(Event::Audited { request, would })
            }
            Some(Err(err)) => Err(err),
            None => Err(ParseError::UnknownKind { kind }),
        },
    }
}

/// Reads the ring buffer as records arrive.
pub mod reader {
    use std::{io, os::fd::AsRawFd};

    use aya::maps::{MapData, RingBuf};
    use tokio::io::{Interest, unix::AsyncFd};

    use super::{Event, ParseError, parse};

    /// The ring buffer, registered with tokio so reads wait for data.
    pub struct EventReader {
        fd: AsyncFd<RingBuf<MapData>>,
    }

    impl EventReader {
        pub fn new(ring: RingBuf<MapData>) -> io::Result<Self> {
            // SAFETY: the ring buffer owns its map fd (a `MapData`), which
            // stays open and unchanged until the `AsyncFd` drops it.
            let fd = unsafe { AsyncFd::register_with_interest(ring, Interest::READABLE) }
                .map_err(io::Error::from)?;
            Ok(Self { fd })
        }

        /// Takes every record available now (without waiting).
        pub fn drain(&mut self) -> Vec<Result<Event, ParseError>> {
            drain_ring(self.fd.get_mut(), usize::MAX)
        }

        /// Waits until at least one record is available and returns the available
        /// ones, at most [`BATCH_LIMIT`]: the rest stay in the ring buffer, where a flood's
        /// backlog costs the agent no memory, until the agent is ready for them.
        pub async fn next_batch(&mut self) -> io::Result<Vec<Result<Event, ParseError>>> {
            loop {
                let mut guard = self.fd.readable_mut().await?;
                let batch = drain_ring(guard.get_inner_mut(), BATCH_LIMIT);
                // Still readable when the batch is full: the ring may not signal again
                // for records it already holds.
                if batch.len() < BATCH_LIMIT {
                    guard.clear_ready();
                }
                if !batch.is_empty() {
                    return Ok(batch);
                }
            }
        }

        #[must_use]
        pub fn raw_fd(&self) -> i32 {
            self.fd.get_ref().as_raw_fd()
        }
    }

    /// Most records [`EventReader::next_batch`] takes at once.
    pub const BATCH_LIMIT: usize = 256;

    fn drain_ring(ring: &mut RingBuf<MapData>, limit: usize) -> Vec<Result<Event, ParseError>> {
        let mut batch = Vec::new();
        while batch.len() < limit
            && let Some(item) = ring.next()
        {
            batch.push(parse(&item));
        }
        batch
    }
}

#[cfg(test)]
mod tests {
    use std::{net::Ipv6Addr, path::PathBuf};

    use gatekeep_common::{
        ARGV_LEN, COMM_LEN, ConnectEvent, ExecEvent, PATH_LEN, action, connect_op, request_kind,
    };

    use super::*;
    use crate::hooks::{
        connect::{AF_INET, AF_INET6, AF_UNIX, Destination, Via},
        exec::split_argv,
    };

    fn header(kind: u32) -> EventHeader {
        let mut comm = [0u8; COMM_LEN];
        comm[..4].copy_from_slice(b"bash");
        EventHeader {
            kind,
            policy_id: 3,
            pid: 100,
            tid: 101,
            uid: 1000,
            gid: 1000,
            ppid: 99,
            _pad: 0,
            cgroup_id: 4242,
            ktime_ns: 5,
            digest: 0xfeed,
            comm,
        }
    }

    fn bytes_of<T: Copy>(value: &T) -> Vec<u8> {
        // SAFETY: reading the bytes of a plain-old-data value.
        unsafe {
            std::slice::from_raw_parts(std::ptr::from_ref::<T>(value).cast::<u8>(), size_of::<T>())
        }
        .to_vec()
    }

    fn exec_event(kind: u32, filename: &[u8], argv: &[u8]) -> ExecEvent {
        let mut event = ExecEvent {
            header: header(kind),
            dev: (8 << 20) | 1,
            ino: 77,
            content: gatekeep_common::ContentVersion::default(),
            action: action::ASK,
            argc: 2,
            argv_len: u32::try_from(argv.len()).expect("len"),
            argv_truncated: 0,
            denied_for: 0,
            flags: 0,
            filename: [0; PATH_LEN],
            argv: [0; ARGV_LEN],
            env_len: 0,
            env_count: 0,
            env: [0; gatekeep_common::ENV_LEN],
        };
        event.filename[..filename.len()].copy_from_slice(filename);
        event.argv[..argv.len()].copy_from_slice(argv);
        event
    }

    #[test]
    fn exec_ask_is_parsed_with_argv_and_identity() {
        let raw = exec_event(event_kind::EXEC_ASK, b"./tool", b"tool\0--flag\0");
        let Event::Ask(Request::Exec(request)) = parse(&bytes_of(&raw)).expect("parse") else {
            panic!("not an exec ask");
        };
        assert_eq!(request.filename, PathBuf::from("./tool"));
        assert_eq!(request.argv, ["tool", "--flag"]);
        assert_eq!(request.dev, (8 << 20) | 1);
        assert_eq!(request.ino, 77);
        assert_eq!(request.origin.tid, 101);
        assert_eq!(request.origin.digest, 0xfeed);
        assert_eq!(request.origin.comm, "bash");
        assert!(!request.argv_truncated);
        assert!(request.env.is_empty(), "no bound environment");
    }

    #[test]
    fn exec_bound_environment_is_parsed_in_order_and_clamped() {
        let mut raw = exec_event(event_kind::EXEC_ASK, b"/bin/x", b"x\0");
        let env = b"LD_PRELOAD=/tmp/e.so\0PYTHONPATH=\x1b[2J\0";
        raw.env[..env.len()].copy_from_slice(env);
        raw.env_len = u32::try_from(env.len()).expect("len");
        raw.env_count = 2;
        let Event::Ask(Request::Exec(request)) = parse(&bytes_of(&raw)).expect("parse") else {
            panic!("not an exec ask");
        };
        assert_eq!(
            request.env,
            ["LD_PRELOAD=/tmp/e.so", "PYTHONPATH=\u{1b}[2J"]
        );
        // A length beyond the buffer is clamped; never more than env_count.
        raw.env_len = u32::MAX;
        raw.env_count = 1;
        let Event::Ask(Request::Exec(request)) = parse(&bytes_of(&raw)).expect("parse") else {
            panic!("not an exec ask");
        };
        assert_eq!(request.env, ["LD_PRELOAD=/tmp/e.so"]);
    }

    #[test]
    fn mapped_and_fileless_events_say_so_and_plain_execs_do_not() {
        let mut raw = exec_event(event_kind::EXEC_DENIED, b"libdenied.so", b"");
        raw.argc = 0;
        raw.flags = gatekeep_common::exec_flags::MAPPED;
        let Event::Denied(Request::Exec(request)) = parse(&bytes_of(&raw)).expect("parse") else {
            panic!("not an exec denial");
        };
        assert!(request.mapped() && !request.fileless());
        assert_eq!(request.via(), Some("mapped as code"));
        assert_eq!(request.filename, PathBuf::from("libdenied.so"));
        assert!(request.argv.is_empty());

        let mut raw = exec_event(event_kind::EXEC_ASK, b"memfd:x\nrm -rf /", b"x\0");
        raw.flags = gatekeep_common::exec_flags::FILELESS;
        let Event::Ask(Request::Exec(request)) = parse(&bytes_of(&raw)).expect("parse") else {
            panic!("not an exec ask");
        };
        assert!(request.fileless() && !request.mapped());
        assert_eq!(request.via(), Some("fileless"));
        // Shown as the workload's name, marked; escaping is the reader's (the CLI's) job.
        assert_eq!(
            crate::hooks::exec::fileless_executable(&request.filename),
            PathBuf::from("/memfd:x\nrm -rf / (no file on disk)")
        );

        let raw = exec_event(event_kind::EXEC_ASK, b"/bin/x", b"x\0");
        let Event::Ask(Request::Exec(request)) = parse(&bytes_of(&raw)).expect("parse") else {
            panic!("not an exec ask");
        };
        assert_eq!(request.via(), None);
    }

    #[test]
    fn truncated_argv_keeps_the_partial_last_argument() {
        let raw = exec_event(event_kind::EXEC_DENIED, b"/bin/x", b"x\0abc");
        let Event::Denied(Request::Exec(request)) = parse(&bytes_of(&raw)).expect("parse") else {
            panic!("not an exec denial");
        };
        assert_eq!(request.argv, ["x", "abc"]);
        // An argv_len beyond the buffer is clamped, not trusted.
        let mut raw = exec_event(event_kind::EXEC_ASK, b"/bin/x", b"x\0");
        raw.argv_len = u32::MAX;
        raw.argc = 1;
        let Event::Ask(Request::Exec(request)) = parse(&bytes_of(&raw)).expect("parse") else {
            panic!("not an exec ask");
        };
        assert_eq!(request.argv, ["x"]);
        assert_eq!(split_argv(b""), Vec::<String>::new());
        assert_eq!(split_argv(b"\0"), [""]);
        assert_eq!(split_argv(b"a\0\0b\0"), ["a", "", "b"]);
        assert_eq!(split_argv(b"a\0\0"), ["a", ""]);
    }

    #[test]
    fn connect_events_decode_each_family() {
        let mut raw = ConnectEvent {
            header: header(event_kind::CONNECT_ASK),
            family: AF_INET,
            sock_type: 1,
            port: 443,
            op: 0,
            action: action::ASK,
            addr: [0; 16],
            unix_path: [0; 108],
            unix_len: 0,
        };
        raw.addr[..4].copy_from_slice(&[10, 1, 2, 3]);
        let Event::Ask(Request::Connect(request)) = parse(&bytes_of(&raw)).expect("parse") else {
            panic!("not a connect ask");
        };
        assert_eq!(request.destination.to_string(), "10.1.2.3:443");

        raw.header.kind = event_kind::CONNECT_DENIED;
        raw.family = AF_INET6;
        raw.addr = Ipv6Addr::LOCALHOST.octets();
        let Event::Denied(Request::Connect(request)) = parse(&bytes_of(&raw)).expect("parse")
        else {
            panic!("not a connect denial");
        };
        assert_eq!(request.destination.to_string(), "[::1]:443");

        raw.family = AF_UNIX;
        raw.unix_path[..6].copy_from_slice(b"\0agent");
        raw.unix_len = 6;
        let Event::Denied(Request::Connect(request)) = parse(&bytes_of(&raw)).expect("parse")
        else {
            panic!("not a connect denial");
        };
        assert_eq!(
            request.destination,
            Destination::Unix {
                path: "@agent".into(),
                name: b"\0agent".to_vec(),
            }
        );
        // The same bytes with two NULs more within the caller's length: another
        // socket, and it reads as one.
        raw.unix_len = 8;
        let Event::Denied(Request::Connect(request)) = parse(&bytes_of(&raw)).expect("parse")
        else {
            panic!("not a connect denial");
        };
        assert_eq!(request.destination.to_string(), "unix:@agent\\x00\\x00");
        // A length past the buffer is bounded by it.
        raw.unix_len = u32::MAX;
        let Event::Denied(Request::Connect(request)) = parse(&bytes_of(&raw)).expect("parse")
        else {
            panic!("not a connect denial");
        };
        let Destination::Unix { name, .. } = &request.destination else {
            panic!("not a unix destination");
        };
        assert_eq!(name.len(), 108);
        raw.unix_len = 0;
        assert_eq!(request.via, Via::Connect);

        // A datagram sent to an address: the same destination, another call.
        raw.op = connect_op::SENDMSG;
        raw.family = AF_INET;
        raw.sock_type = 2;
        raw.addr = [0; 16];
        raw.addr[..4].copy_from_slice(&[127, 0, 0, 1]);
        let Event::Denied(Request::Connect(request)) = parse(&bytes_of(&raw)).expect("parse")
        else {
            panic!("not a connect denial");
        };
        assert_eq!(
            (request.destination.to_string(), request.via),
            ("127.0.0.1:443".to_owned(), Via::Sendmsg)
        );

        // A refused raw socket: no address, `port` is the protocol.
        raw.op = connect_op::SOCKET;
        raw.sock_type = 3;
        raw.port = 1;
        let Event::Denied(Request::Connect(request)) = parse(&bytes_of(&raw)).expect("parse")
        else {
            panic!("not a connect denial");
        };
        assert_eq!(
            request.destination,
            Destination::RawSocket {
                family: AF_INET,
                protocol: 1
            }
        );
        assert_eq!(request.via, Via::Socket);
        assert_eq!(
            request.destination.to_string(),
            "raw socket (family 2, protocol 1)"
        );
    }

    #[test]
    fn task_events_carry_request_kind_and_action() {
        let raw = TaskEvent {
            header: header(event_kind::VERDICT_APPLIED),
            request_kind: request_kind::CONNECT,
            action: action::DENY,
        };
        assert_eq!(
            parse(&bytes_of(&raw)).expect("parse"),
            Event::VerdictApplied {
                origin: origin(&raw.header),
                kind: RequestKind(request_kind::CONNECT),
                action: action::DENY,
            }
        );
        let raw = TaskEvent {
            header: header(event_kind::ABANDONED),
            request_kind: request_kind::EXEC,
            action: 0,
        };
        assert!(matches!(
            parse(&bytes_of(&raw)),
            Ok(Event::Abandoned {
                kind: RequestKind(request_kind::EXEC),
                ..
            })
        ));
    }

    #[test]
    fn changed_argv_and_changed_environment_are_told_apart() {
        for (kind, name) in [
            (event_kind::EXEC_ARGV_CHANGED, "exec_argv_changed"),
            (event_kind::EXEC_ENV_CHANGED, "exec_env_changed"),
        ] {
            let raw = TaskEvent {
                header: header(kind),
                request_kind: request_kind::EXEC,
                action: action::DENY,
            };
            let event = parse(&bytes_of(&raw)).expect("parse");
            assert_eq!(event.name(), name);
            assert_eq!(event.origin(), &origin(&raw.header));
        }
    }

    #[test]
    fn short_and_unknown_records_are_refused() {
        assert_eq!(parse(&[1, 0, 0, 0]), Err(ParseError::TooShort { len: 4 }));
        let raw = exec_event(event_kind::EXEC_ASK, b"/x", b"");
        let bytes = bytes_of(&raw);
        let cut = size_of::<EventHeader>() + 10;
        assert_eq!(
            parse(&bytes[..cut]),
            Err(ParseError::Truncated {
                kind: event_kind::EXEC_ASK,
                len: cut,
                expected: size_of::<ExecEvent>(),
            })
        );
        let mut unknown = bytes_of(&header(99));
        unknown.extend([0; 8]);
        assert_eq!(parse(&unknown), Err(ParseError::UnknownKind { kind: 99 }));
    }
}
