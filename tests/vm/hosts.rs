//! Host-name connect rules (issue 20, item 3) end to end: a DNS server on
//! the VM's loopback (127.0.0.1:53, [`Resolver`], started by the test)
//! answers names with loopback addresses, and the gated workload resolves
//! them itself, as root inside its cgroup, then connects.
//!
//! The workload half is [`run`], reached as `dns COMMAND ...` (see
//! `workload.rs`); every command prints one line: `ok`, `errno N` of the
//! connect, or `noanswer`.

use std::{
    net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream, UdpSocket},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    thread::JoinHandle,
    time::Duration,
};

use gatekeep_tests::{Agent, Cgroup, policy, require_vm, workload::line_of};
use hickory_proto::{
    op::{Message, MessageType, OpCode, Query},
    rr::{Name, RData, Record, RecordType, rdata::A},
};

/// The names the test resolver knows: (name, address, TTL in seconds).
const ZONE: &[(&str, [u8; 4], u32)] = &[
    ("api.allowed.test.", [127, 0, 0, 2], 300),
    ("short.allowed.test.", [127, 0, 0, 4], 2),
    ("evil.test.", [127, 0, 0, 3], 300),
];

// ---------------------------------------------------------------------------
// The workload's commands.

/// `dns COMMAND ...`:
/// - `resolve-connect NAME PORT [SLEEP_MS]`: asks 127.0.0.1:53 for NAME's A
///   record, waits SLEEP_MS, then connects (TCP) to the first address on
///   PORT;
/// - `forge-connect NAME FAKE_IP PORT`: asks 127.0.0.1:53 for NAME and,
///   before the answer, sends itself a forged answer (NAME -> FAKE_IP) from
///   a socket of its own bound to port 53 of another loopback address;
///   prints `forged-received` if the forged answer arrived, then connects
///   to FAKE_IP:PORT.
pub fn run(args: &[String]) -> i32 {
    let arg = |i: usize| args.get(i).map_or("", String::as_str);
    match arg(0) {
        "resolve-connect" => {
            let sleep = arg(3).parse().unwrap_or(0);
            let Some(addr) = resolve(arg(1)) else {
                println!("noanswer");
                return 3;
            };
            std::thread::sleep(Duration::from_millis(sleep));
            connect(addr, arg(2))
        }
        "forge-connect" => forge_connect(arg(1), arg(2), arg(3)),
        other => {
            println!("unknown dns command {other:?}");
            2
        }
    }
}

fn query_bytes(id: u16, name: &str) -> Vec<u8> {
    let mut message = Message::new(id, MessageType::Query, OpCode::Query);
    message.metadata.recursion_desired = true;
    message.add_query(Query::query(
        Name::from_ascii(name).expect("name"),
        RecordType::A,
    ));
    message.to_vec().expect("encode query")
}

fn answer_bytes(id: u16, name: &str, addr: [u8; 4], ttl: u32) -> Vec<u8> {
    let mut message = Message::new(id, MessageType::Response, OpCode::Query);
    message.add_query(Query::query(
        Name::from_ascii(name).expect("name"),
        RecordType::A,
    ));
    message.add_answer(Record::from_rdata(
        Name::from_ascii(name).expect("name"),
        ttl,
        RData::A(A(Ipv4Addr::from(addr))),
    ));
    message.to_vec().expect("encode answer")
}

/// The first A record of `name`'s answer from 127.0.0.1:53 on `socket`.
fn first_a(socket: &UdpSocket, id: u16) -> Option<Ipv4Addr> {
    let mut buf = [0u8; 1500];
    loop {
        let (len, from) = socket.recv_from(&mut buf).ok()?;
        let message = Message::from_vec(&buf[..len]).ok()?;
        if message.metadata.id != id || from.port() != 53 {
            continue;
        }
        return message
            .answers
            .iter()
            .find_map(|record| match &record.data {
                RData::A(a) => Some(a.0),
                _ => None,
            });
    }
}

fn resolve(name: &str) -> Option<Ipv4Addr> {
    let socket = UdpSocket::bind("127.0.0.1:0").ok()?;
    socket
        .set_read_timeout(Some(Duration::from_secs(20)))
        .ok()?;
    let id = (std::process::id() & 0xffff) as u16;
    socket
        .send_to(&query_bytes(id, name), "127.0.0.1:53")
        .ok()?;
    first_a(&socket, id)
}

fn connect(addr: Ipv4Addr, port: &str) -> i32 {
    let port: u16 = port.parse().unwrap_or(0);
    match TcpStream::connect_timeout(&SocketAddr::from((addr, port)), Duration::from_secs(20)) {
        Ok(_) => {
            println!("ok");
            0
        }
        Err(err) => {
            println!("errno {}", err.raw_os_error().unwrap_or(-1));
            1
        }
    }
}

fn forge_connect(name: &str, fake: &str, port: &str) -> i32 {
    let Ok(fake) = fake.parse::<Ipv4Addr>() else {
        println!("bad address");
        return 2;
    };
    let client = UdpSocket::bind("127.0.0.1:0").expect("client socket");
    client
        .set_read_timeout(Some(Duration::from_secs(3)))
        .expect("timeout");
    let id = (std::process::id() & 0xffff) as u16;
    // The forger speaks from port 53 of another loopback address (the real
    // resolver holds 127.0.0.1:53).
    let forger = UdpSocket::bind("127.0.0.9:53").expect("bind 127.0.0.9:53 (root?)");
    let client_addr = client.local_addr().expect("client address");
    // A forged answer before the query: nothing waits for it yet.
    let _ = forger.send_to(&answer_bytes(id, name, fake.octets(), 300), client_addr);
    client
        .send_to(&query_bytes(id, name), "127.0.0.1:53")
        .expect("send query");
    // And one after, racing the real answer.
    let _ = forger.send_to(&answer_bytes(id, name, fake.octets(), 300), client_addr);
    let mut buf = [0u8; 1500];
    let mut forged = false;
    while let Ok((len, from)) = client.recv_from(&mut buf) {
        if from.ip() != std::net::IpAddr::from([127, 0, 0, 1]) {
            forged = true;
        }
        let _ = len;
    }
    if forged {
        print!("forged-received ");
    }
    connect(fake, port)
}

// ---------------------------------------------------------------------------
// The test's resolver.

/// A DNS server on 127.0.0.1:53 answering [`ZONE`] (NXDOMAIN-free: unknown
/// names get an empty answer); stops when dropped.
struct Resolver {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Resolver {
    fn start() -> Self {
        let socket =
            UdpSocket::bind("127.0.0.1:53").expect("bind the test resolver on 127.0.0.1:53");
        socket
            .set_read_timeout(Some(Duration::from_millis(100)))
            .expect("timeout");
        let stop = Arc::new(AtomicBool::new(false));
        let thread = std::thread::spawn({
            let stop = Arc::clone(&stop);
            move || {
                let mut buf = [0u8; 1500];
                while !stop.load(Ordering::Relaxed) {
                    let Ok((len, from)) = socket.recv_from(&mut buf) else {
                        continue;
                    };
                    let Ok(query) = Message::from_vec(&buf[..len]) else {
                        continue;
                    };
                    let Some(question) = query.queries.first() else {
                        continue;
                    };
                    let asked = question.name().to_ascii().to_ascii_lowercase();
                    let mut reply =
                        Message::new(query.metadata.id, MessageType::Response, OpCode::Query);
                    reply.add_query(question.clone());
                    for (name, addr, ttl) in ZONE {
                        if *name == asked {
                            reply.add_answer(Record::from_rdata(
                                question.name().clone(),
                                *ttl,
                                RData::A(A(Ipv4Addr::from(*addr))),
                            ));
                        }
                    }
                    if let Ok(bytes) = reply.to_vec() {
                        let _ = socket.send_to(&bytes, from);
                    }
                }
            }
        });
        Self {
            stop,
            thread: Some(thread),
        }
    }
}

impl Drop for Resolver {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// Cgroup `gk-<name>` gated by a policy whose connect table is `connect`
/// (asks time out denied after 2 s), with an agent believing the test
/// resolver.
fn gate_hosts(name: &str, connect: &str) -> (Cgroup, Agent) {
    let cgroup_name = format!("gk-{name}");
    let cgroup = Cgroup::create(&cgroup_name);
    let agent = Agent::start_with(
        name,
        &policy::connect(&cgroup_name, connect, &policy::on_timeout("2s", "deny")),
        "[decision]\nmode = \"local\"\n[dns]\nresolvers = [\"127.0.0.1\"]\n",
    );
    (cgroup, agent)
}

/// A TCP listener on every local address (127.0.0.2 and 127.0.0.3 alike).
fn listener() -> (TcpListener, u16) {
    let listener = TcpListener::bind("0.0.0.0:0").expect("listener");
    let port = listener.local_addr().expect("address").port();
    (listener, port)
}

fn connect_table(port: u16) -> String {
    format!(
        "default = \"deny\"\nallow = [\"127.0.0.1\", \"api.allowed.test:{port}\", \"short.allowed.test:{port}\"]\nask = [\"evil.test:{port}\"]"
    )
}

#[test]
fn host_rules_decide_connects_by_the_name_the_workload_resolved() {
    require_vm();
    let _resolver = Resolver::start();
    let (_listener, port) = listener();
    let port_text = port.to_string();
    let (cgroup, agent) = gate_hosts("hosts", &connect_table(port));

    // Not resolved by this workload: the network rules and the default.
    assert_eq!(
        line_of(Some(&cgroup), &["connect", "127.0.0.2", &port_text]),
        "errno 1",
        "an address nobody resolved gets the default deny"
    );
    // Resolved to an allowed name: runs at once.
    assert_eq!(
        line_of(
            Some(&cgroup),
            &["dns", "resolve-connect", "api.allowed.test.", &port_text]
        ),
        "ok"
    );
    // The same address on another port: no host rule covers it.
    let (_other, other_port) = listener();
    assert_eq!(
        line_of(
            Some(&cgroup),
            &[
                "dns",
                "resolve-connect",
                "api.allowed.test.",
                &other_port.to_string()
            ]
        ),
        "errno 1"
    );
    // Resolved to a name the policy asks about: asked (the reviewer sees
    // the name), denied when nobody answers within 2 s.
    assert_eq!(
        line_of(
            Some(&cgroup),
            &["dns", "resolve-connect", "evil.test.", &port_text]
        ),
        "errno 1"
    );
    let requested = agent.wait_record("requested", Duration::from_secs(20), |r| {
        r["payload"]["request"]["target"]["kind"] == "connect"
    });
    let target = &requested["payload"]["request"]["target"];
    assert_eq!(target["address"], "127.0.0.3");
    assert_eq!(target["resolved"], serde_json::json!(["evil.test"]));
    assert_eq!(
        requested["payload"]["request"]["rule"],
        format!("connect rule ask evil.test:{port} (resolved evil.test)")
    );
}

#[test]
fn host_rules_end_with_the_answer_ttl() {
    require_vm();
    let _resolver = Resolver::start();
    let (_listener, port) = listener();
    let port_text = port.to_string();
    let (cgroup, agent) = gate_hosts("hosts-ttl", &connect_table(port));
    // The same kind of rule for a name with a long TTL lets the connect
    // through, 4 s after the answer.
    assert_eq!(
        line_of(
            Some(&cgroup),
            &[
                "dns",
                "resolve-connect",
                "api.allowed.test.",
                &port_text,
                "4000"
            ]
        ),
        "ok"
    );
    // short.allowed.test (127.0.0.4) has a TTL of 2 s: it is learned, but
    // 4 s after the answer the host rule no longer applies and the default
    // denies.
    assert_eq!(
        line_of(
            Some(&cgroup),
            &[
                "dns",
                "resolve-connect",
                "short.allowed.test.",
                &port_text,
                "4000"
            ]
        ),
        "errno 1"
    );
    agent.wait_log("name=short.allowed.test", 1, Duration::from_secs(20));
}

#[test]
fn forged_answers_from_inside_the_gated_cgroup_widen_nothing() {
    require_vm();
    let _resolver = Resolver::start();
    let (_listener, port) = listener();
    let (cgroup, agent) = gate_hosts("hosts-forge", &connect_table(port));
    // As root in the cgroup: a forged answer mapping the allowed name to
    // 127.0.0.3 never reaches the workload (a gated socket cannot send from
    // port 53), and the real answer says 127.0.0.2: 127.0.0.3 stays denied.
    assert_eq!(
        line_of(
            Some(&cgroup),
            &[
                "dns",
                "forge-connect",
                "api.allowed.test.",
                "127.0.0.3",
                &port.to_string()
            ]
        ),
        "errno 1"
    );
    // The real answer was learned all the same.
    agent.wait_log("learned from a DNS answer", 1, Duration::from_secs(20));
}
