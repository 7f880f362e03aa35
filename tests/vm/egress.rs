//! Egress beyond `connect()` (issue 19, item 6), tried as the workload would:
//! as root inside the gated cgroup, and unprivileged (`as-user 65534`).
//!
//! - datagrams sent to an address without `connect()` (UDP, ICMP "ping"
//!   sockets, `AF_UNSPEC` destinations), counted where they would arrive;
//! - TCP Fast Open (`sendto` with `MSG_FASTOPEN`);
//! - `0.0.0.0` and `::` reaching denied loopback listeners;
//! - raw and packet sockets;
//! - `AF_UNIX` and other families (netlink to another process) under
//!   `connect.default = "deny"`.
//!
//! The workload half is [`run`], reached as `net COMMAND ...` (see
//! `workload.rs`); every command prints `ok` (exit 0) or `errno N` (exit 1)
//! of the call under test.
#![expect(
    clippy::cast_possible_truncation,
    clippy::cast_possible_wrap,
    reason = "libc's address families and the sockaddr sizes are small constants, and path bytes are copied into C chars as they are"
)]

use std::{
    mem::{size_of, zeroed},
    net::{IpAddr, Ipv4Addr, Ipv6Addr, TcpListener, UdpSocket},
    os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd},
    time::Duration,
};

use gatekeep_tests::{
    gate_connect, loopback_listener,
    policy::on_timeout,
    require_vm,
    workload::{Outcome, line_of, run_in},
};

const OK: &str = "ok";
const EPERM: &str = "errno 1";
/// The unprivileged user the tests drop to.
const NOBODY: &str = "65534";

// ---------------------------------------------------------------------------
// The workload's commands.

/// `net COMMAND ...`:
/// - `udp-send IP PORT N [unspec]`: N datagrams with `sendto` on an
///   unconnected UDP socket (`unspec`: an IPv4 destination whose family is
///   `AF_UNSPEC`, which `udp_sendmsg` sends to all the same);
/// - `tfo IP PORT`: `sendto(MSG_FASTOPEN)` on a new TCP socket;
/// - `ping IP [PORT]`: an echo request from an ICMP "ping" socket
///   (`SOCK_DGRAM`, `IPPROTO_ICMP`), `sin_port` = PORT;
/// - `raw-icmp [IP]`: a raw ICMP socket (and an echo request to IP);
/// - `raw-icmp6`: a raw `ICMPv6` socket; `packet`: an `AF_PACKET` socket;
/// - `unix-connect PATH`, `unix-send PATH`: stream connect / datagram `sendto`
///   (`@NAME`: the abstract name NAME; a connect passes its exact length,
///   or that and N more NULs with `unix-connect @NAME N`);
///   `unix-connect-junk PATH`: a stream connect to PATH with bytes after
///   its NUL (which the kernel ignores);
/// - `netlink-send PORTID`: a `NETLINK_USERSOCK` datagram to another
///   process's port id; `netlink-kernel`: a `NETLINK_ROUTE` request to the
///   kernel (port id 0).
pub fn run(args: &[String]) -> i32 {
    let arg = |i: usize| args.get(i).map_or("", String::as_str);
    let result = match arg(0) {
        "udp-send" => udp_send(arg(1), arg(2), arg(3), arg(4) == "unspec"),
        "tfo" => tfo(arg(1), arg(2)),
        "ping" => ping(arg(1), arg(2)),
        "raw-icmp" => raw_icmp(arg(1)),
        "raw-icmp6" => socket(libc::AF_INET6, libc::SOCK_RAW, libc::IPPROTO_ICMPV6).map(drop),
        "packet" => socket(
            libc::AF_PACKET,
            libc::SOCK_RAW,
            i32::from((libc::ETH_P_ALL as u16).to_be()),
        )
        .map(drop),
        "unix-connect" => unix(arg(1), libc::SOCK_STREAM, arg(2).parse().unwrap_or(0)),
        "unix-connect-junk" => unix_junk(arg(1)),
        "unix-send" => unix(arg(1), libc::SOCK_DGRAM, 0),
        "netlink-send" => netlink_send(arg(1).parse().unwrap_or(0)),
        "netlink-kernel" => netlink_kernel(),
        other => {
            println!("unknown net command {other:?}");
            return 2;
        }
    };
    match result {
        Ok(()) => {
            println!("{OK}");
            0
        }
        Err(errno) => {
            println!("errno {errno}");
            1
        }
    }
}

fn last_errno() -> i32 {
    std::io::Error::last_os_error().raw_os_error().unwrap_or(-1)
}

fn check(ret: isize) -> Result<(), i32> {
    if ret < 0 { Err(last_errno()) } else { Ok(()) }
}

fn socket(family: i32, kind: i32, protocol: i32) -> Result<OwnedFd, i32> {
    // SAFETY: a plain syscall; the descriptor is owned from here on.
    let fd = unsafe { libc::socket(family, kind, protocol) };
    if fd < 0 {
        return Err(last_errno());
    }
    // SAFETY: a fresh descriptor nobody else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// `sendto(fd, data, flags, address)`.
fn send_to<A>(fd: &OwnedFd, data: &[u8], flags: i32, address: &A) -> Result<(), i32> {
    // SAFETY: the buffers outlive the call; the address is a sockaddr_*.
    let ret = unsafe {
        libc::sendto(
            fd.as_raw_fd(),
            data.as_ptr().cast(),
            data.len(),
            flags,
            std::ptr::from_ref(address).cast(),
            size_of::<A>() as libc::socklen_t,
        )
    };
    check(ret)
}

fn sockaddr_in(ip: Ipv4Addr, port: u16) -> libc::sockaddr_in {
    // SAFETY: all-zero is a valid sockaddr_in.
    let mut sa: libc::sockaddr_in = unsafe { zeroed() };
    sa.sin_family = libc::AF_INET as u16;
    sa.sin_port = port.to_be();
    sa.sin_addr.s_addr = u32::from_ne_bytes(ip.octets());
    sa
}

fn sockaddr_in6(ip: Ipv6Addr, port: u16) -> libc::sockaddr_in6 {
    // SAFETY: all-zero is a valid sockaddr_in6.
    let mut sa: libc::sockaddr_in6 = unsafe { zeroed() };
    sa.sin6_family = libc::AF_INET6 as u16;
    sa.sin6_port = port.to_be();
    sa.sin6_addr.s6_addr = ip.octets();
    sa
}

fn ip_of(text: &str) -> Result<IpAddr, i32> {
    text.parse().map_err(|_| -2)
}

fn udp_send(ip: &str, port: &str, count: &str, unspec: bool) -> Result<(), i32> {
    let port: u16 = port.parse().map_err(|_| -2)?;
    let count: u32 = count.parse().map_err(|_| -2)?;
    let data = b"gatekeep datagram";
    match ip_of(ip)? {
        IpAddr::V4(v4) => {
            let fd = socket(libc::AF_INET, libc::SOCK_DGRAM, 0)?;
            let mut sa = sockaddr_in(v4, port);
            if unspec {
                sa.sin_family = libc::AF_UNSPEC as u16;
            }
            (0..count).try_for_each(|_| send_to(&fd, data, 0, &sa))
        }
        IpAddr::V6(v6) => {
            let fd = socket(libc::AF_INET6, libc::SOCK_DGRAM, 0)?;
            let sa = sockaddr_in6(v6, port);
            (0..count).try_for_each(|_| send_to(&fd, data, 0, &sa))
        }
    }
}

fn tfo(ip: &str, port: &str) -> Result<(), i32> {
    let port: u16 = port.parse().map_err(|_| -2)?;
    let IpAddr::V4(v4) = ip_of(ip)? else {
        return Err(-2);
    };
    let fd = socket(libc::AF_INET, libc::SOCK_STREAM, 0)?;
    send_to(
        &fd,
        b"fast open",
        libc::MSG_FASTOPEN,
        &sockaddr_in(v4, port),
    )
}

/// An ICMP echo request (type 8), checksum left to the kernel (ping
/// sockets) or computed (raw sockets).
fn echo_request() -> [u8; 8] {
    let mut packet = [8u8, 0, 0, 0, 0x12, 0x34, 0, 1];
    let sum: u32 = packet
        .chunks(2)
        .map(|w| u32::from(u16::from_be_bytes([w[0], w[1]])))
        .sum();
    let folded = (sum & 0xffff) + (sum >> 16);
    let checksum = !(folded as u16);
    packet[2..4].copy_from_slice(&checksum.to_be_bytes());
    packet
}

fn ping(ip: &str, port: &str) -> Result<(), i32> {
    let IpAddr::V4(v4) = ip_of(ip)? else {
        return Err(-2);
    };
    let port: u16 = port.parse().unwrap_or(0);
    let fd = socket(libc::AF_INET, libc::SOCK_DGRAM, libc::IPPROTO_ICMP)?;
    send_to(&fd, &echo_request(), 0, &sockaddr_in(v4, port))
}

fn raw_icmp(ip: &str) -> Result<(), i32> {
    let fd = socket(libc::AF_INET, libc::SOCK_RAW, libc::IPPROTO_ICMP)?;
    if ip.is_empty() {
        return Ok(());
    }
    let IpAddr::V4(v4) = ip_of(ip)? else {
        return Err(-2);
    };
    send_to(&fd, &echo_request(), 0, &sockaddr_in(v4, 0))
}

fn sockaddr_un(path: &str) -> libc::sockaddr_un {
    // SAFETY: all-zero is a valid sockaddr_un.
    let mut sa: libc::sockaddr_un = unsafe { zeroed() };
    sa.sun_family = libc::AF_UNIX as u16;
    // `@NAME`: an abstract name, whose first byte is NUL.
    let bytes = path
        .strip_prefix('@')
        .map_or(path.as_bytes(), str::as_bytes);
    let skip = usize::from(path.starts_with('@'));
    for (slot, byte) in sa.sun_path.iter_mut().skip(skip).zip(bytes) {
        *slot = *byte as libc::c_char;
    }
    sa
}

/// `trailing_nuls`: NULs an abstract name's connect adds to its length
/// (part of the name for the kernel: another socket).
fn unix(path: &str, kind: i32, trailing_nuls: usize) -> Result<(), i32> {
    let fd = socket(libc::AF_UNIX, kind, 0)?;
    let sa = sockaddr_un(path);
    if kind == libc::SOCK_DGRAM {
        return send_to(&fd, b"unix datagram", 0, &sa);
    }
    // An abstract name is exactly its bytes (as `bind` of std's abstract
    // addresses makes it); a pathname passes the whole structure.
    let len = if path.starts_with('@') {
        (2 + path.len() + trailing_nuls).min(size_of::<libc::sockaddr_un>())
    } else {
        size_of::<libc::sockaddr_un>()
    };
    // SAFETY: a sockaddr_un, `len` no longer than it.
    let ret = unsafe {
        libc::connect(
            fd.as_raw_fd(),
            std::ptr::from_ref(&sa).cast(),
            len as libc::socklen_t,
        )
    };
    check(ret as isize)
}

/// A stream connect to the path `path`, whose `sun_path` has `J` bytes
/// after the path's NUL, all of them passed.
fn unix_junk(path: &str) -> Result<(), i32> {
    let fd = socket(libc::AF_UNIX, libc::SOCK_STREAM, 0)?;
    let mut sa = sockaddr_un(path);
    for slot in sa.sun_path.iter_mut().skip(path.len() + 1) {
        *slot = b'J' as libc::c_char;
    }
    // SAFETY: a whole sockaddr_un.
    let ret = unsafe {
        libc::connect(
            fd.as_raw_fd(),
            std::ptr::from_ref(&sa).cast(),
            size_of::<libc::sockaddr_un>() as libc::socklen_t,
        )
    };
    check(ret as isize)
}

fn sockaddr_nl(pid: u32) -> libc::sockaddr_nl {
    // SAFETY: all-zero is a valid sockaddr_nl.
    let mut sa: libc::sockaddr_nl = unsafe { zeroed() };
    sa.nl_family = libc::AF_NETLINK as u16;
    sa.nl_pid = pid;
    sa
}

/// A netlink message header (16 bytes) with no payload.
fn nlmsg(kind: u16, flags: u16) -> [u8; 16] {
    let mut message = [0u8; 16];
    message[..4].copy_from_slice(&16u32.to_ne_bytes());
    message[4..6].copy_from_slice(&kind.to_ne_bytes());
    message[6..8].copy_from_slice(&flags.to_ne_bytes());
    message
}

fn netlink_send(port_id: u32) -> Result<(), i32> {
    let fd = socket(libc::AF_NETLINK, libc::SOCK_RAW, libc::NETLINK_USERSOCK)?;
    send_to(&fd, &nlmsg(0x10, 0), 0, &sockaddr_nl(port_id))
}

fn netlink_kernel() -> Result<(), i32> {
    let fd = socket(libc::AF_NETLINK, libc::SOCK_RAW, libc::NETLINK_ROUTE)?;
    let request = nlmsg(
        libc::RTM_GETLINK,
        (libc::NLM_F_REQUEST | libc::NLM_F_DUMP) as u16,
    );
    send_to(&fd, &request, 0, &sockaddr_nl(0))
}

// ---------------------------------------------------------------------------
// The receiving ends, outside any gated cgroup.

/// A UDP socket on `ip`:0 (outside any gated cgroup), non-blocking.
fn udp_listener(ip: &str) -> (UdpSocket, u16) {
    let socket = UdpSocket::bind((ip, 0)).expect("bind a UDP listener");
    socket.set_nonblocking(true).expect("non-blocking");
    let port = socket.local_addr().expect("local addr").port();
    (socket, port)
}

/// How many datagrams are waiting on `socket`.
fn datagrams(socket: &UdpSocket) -> usize {
    let mut buf = [0u8; 256];
    let mut count = 0;
    while socket.recv(&mut buf).is_ok() {
        count += 1;
    }
    count
}

/// How many connections are waiting on `listener`.
fn connections(listener: &TcpListener) -> usize {
    listener.set_nonblocking(true).expect("non-blocking");
    let mut count = 0;
    while listener.accept().is_ok() {
        count += 1;
    }
    count
}

/// A `NETLINK_USERSOCK` socket bound to a port id of the kernel's choice,
/// non-blocking, and that port id.
fn netlink_listener() -> (OwnedFd, u32) {
    let fd = socket(
        libc::AF_NETLINK,
        libc::SOCK_RAW | libc::SOCK_NONBLOCK,
        libc::NETLINK_USERSOCK,
    )
    .unwrap_or_else(|errno| panic!("no NETLINK_USERSOCK socket in this kernel: errno {errno}"));
    let mut sa = sockaddr_nl(0);
    let mut len = size_of::<libc::sockaddr_nl>() as libc::socklen_t;
    // SAFETY: a sockaddr_nl of the size passed, for both calls.
    unsafe {
        assert_eq!(
            libc::bind(fd.as_raw_fd(), std::ptr::from_ref(&sa).cast(), len),
            0,
            "bind a netlink socket"
        );
        assert_eq!(
            libc::getsockname(
                fd.as_raw_fd(),
                std::ptr::from_mut(&mut sa).cast(),
                &raw mut len
            ),
            0
        );
    }
    (fd, sa.nl_pid)
}

/// How many messages are waiting on a non-blocking socket.
fn messages(fd: &OwnedFd) -> usize {
    let mut buf = [0u8; 256];
    let mut count = 0;
    // SAFETY: a buffer of the size passed.
    while unsafe { libc::recv(fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) } >= 0 {
        count += 1;
    }
    count
}

/// A unix socket of `kind` bound at a fresh path anyone may reach, and
/// the path (kept alive by the returned directory).
fn unix_listener(kind: i32) -> (OwnedFd, String, tempfile::TempDir) {
    use std::os::unix::fs::PermissionsExt as _;
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o777))
        .expect("chmod the folder");
    let path = dir.path().join("sock").to_string_lossy().into_owned();
    let fd = socket(libc::AF_UNIX, kind | libc::SOCK_NONBLOCK, 0).expect("unix socket");
    let sa = sockaddr_un(&path);
    // SAFETY: a sockaddr_un of the size passed; a plain listen.
    unsafe {
        assert_eq!(
            libc::bind(
                fd.as_raw_fd(),
                std::ptr::from_ref(&sa).cast(),
                size_of::<libc::sockaddr_un>() as libc::socklen_t,
            ),
            0,
            "bind {path}"
        );
        if kind == libc::SOCK_STREAM {
            assert_eq!(libc::listen(fd.as_raw_fd(), 8), 0);
        }
    }
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o777))
        .expect("chmod the socket");
    (fd, path, dir)
}

/// Lets ICMP "ping" sockets be made by every group (the default, "1 0",
/// lets nobody, root included).
fn allow_ping_sockets() {
    std::fs::write("/proc/sys/net/ipv4/ping_group_range", "0 2147483647")
        .expect("set net.ipv4.ping_group_range");
}

/// The workload's `net` command as root and as nobody, in `cgroup`: the
/// lines it printed.
fn as_root_and_nobody(cgroup: &gatekeep_tests::Cgroup, command: &[&str]) -> [String; 2] {
    let mut args = vec!["net"];
    args.extend_from_slice(command);
    let root = line_of(Some(cgroup), &args);
    let mut user = vec!["as-user", NOBODY];
    user.extend_from_slice(&args);
    [root, line_of(Some(cgroup), &user)]
}

// ---------------------------------------------------------------------------
// The tests.

#[test]
fn kernel_offsets_for_sends_match_the_vm_kernel() {
    require_vm();
    let offsets = gatekeep_agent::bpf::programs::kernel_offsets().expect("kernel offsets");
    // v6.12's `struct msghdr` starts `void *msg_name; int msg_namelen;`, and
    // `struct sock_common` has the two 4-byte addresses, the 4-byte hash
    // and the two 2-byte ports before `skc_family`.
    assert_eq!(offsets.msghdr_msg_name, 0);
    assert_eq!(offsets.msghdr_msg_namelen, 8);
    assert_eq!(offsets.sock_skc_family, 16);
    assert!(offsets.socket_sk > offsets.socket_type);
    assert!(offsets.sock_sk_protocol > offsets.sock_skc_family);
}

#[test]
fn connect_to_the_unspecified_address_is_decided_as_loopback() {
    require_vm();
    let (listener, port) = loopback_listener();
    let v6_listener =
        TcpListener::bind("[::1]:0").expect("bind [::1]: the VM kernel has IPv6 loopback");
    let v6_port = v6_listener.local_addr().expect("local addr").port();
    let (cgroup, agent) = gate_connect(
        "egress-any",
        &format!("default = \"allow\"\ndeny = [\"127.0.0.1:{port}\", \"[::1]:{v6_port}\"]"),
        "",
    );
    for ip in ["0.0.0.0", "127.0.0.1", "::", "::ffff:0.0.0.0"] {
        let port = if ip == "::" { v6_port } else { port };
        let root = run_in(
            &cgroup,
            &["connect", ip, &port.to_string()],
            Duration::from_mins(1),
        );
        assert_eq!(root, Outcome::connect_denied(), "root connect to {ip}");
        let user = run_in(
            &cgroup,
            &["as-user", NOBODY, "connect", ip, &port.to_string()],
            Duration::from_mins(1),
        );
        assert_eq!(user, Outcome::connect_denied(), "nobody's connect to {ip}");
    }
    assert_eq!(connections(&listener), 0, "nothing reached 127.0.0.1");
    assert_eq!(connections(&v6_listener), 0, "nothing reached ::1");
    let record = agent.wait_record("kernel_denied", Duration::from_secs(20), |r| {
        r["payload"]["kind"] == "connect" && r["payload"]["target"]["port"] == port
    });
    assert_eq!(
        record["payload"]["target"]["address"], "127.0.0.1",
        "the reviewer sees where 0.0.0.0 goes"
    );
    // Another port of the same address is allowed, 0.0.0.0 included.
    let (_other, other_port) = loopback_listener();
    assert_eq!(
        run_in(
            &cgroup,
            &["connect", "0.0.0.0", &other_port.to_string()],
            Duration::from_mins(1)
        ),
        Outcome::connected()
    );
}

#[test]
fn datagrams_sent_without_connect_to_a_denied_address_never_arrive() {
    require_vm();
    let (denied, port) = udp_listener("127.0.0.1");
    let (allowed, allowed_port) = udp_listener("127.0.0.1");
    let (cgroup, agent) = gate_connect(
        "egress-udp",
        &format!("default = \"allow\"\ndeny = [\"127.0.0.1:{port}\"]"),
        "",
    );
    let port_text = port.to_string();
    for (ip, unspec) in [("127.0.0.1", ""), ("0.0.0.0", ""), ("127.0.0.1", "unspec")] {
        let lines = as_root_and_nobody(&cgroup, &["udp-send", ip, &port_text, "8", unspec]);
        assert_eq!(lines, [EPERM, EPERM], "sendto {ip}:{port} {unspec}");
    }
    assert_eq!(
        datagrams(&denied),
        0,
        "datagrams that reached the denied port"
    );
    let record = agent.wait_record("kernel_denied", Duration::from_secs(20), |r| {
        r["payload"]["kind"] == "connect" && r["payload"]["target"]["port"] == port
    });
    assert_eq!(record["payload"]["target"]["address"], "127.0.0.1");
    assert_eq!(record["payload"]["target"]["socket_type"], "dgram");
    assert_eq!(record["payload"]["kernel"]["call"], "sendmsg");
    assert_eq!(
        record["payload"]["rule"],
        format!("connect deny 127.0.0.1/32:{port}")
    );

    // The same sends to an allowed port arrive: the workload does send.
    let lines = as_root_and_nobody(
        &cgroup,
        &["udp-send", "0.0.0.0", &allowed_port.to_string(), "8"],
    );
    assert_eq!(lines, [OK, OK]);
    assert_eq!(datagrams(&allowed), 16);
}

#[test]
fn datagrams_to_an_address_that_asks_wait_for_the_decision() {
    require_vm();
    let (socket, port) = udp_listener("127.0.0.1");
    let (cgroup, agent) = gate_connect(
        "egress-udp-ask",
        "default = \"ask\"",
        &on_timeout("2s", "allow"),
    );
    let started = std::time::Instant::now();
    let line = line_of(
        Some(&cgroup),
        &["net", "udp-send", "127.0.0.1", &port.to_string(), "1"],
    );
    assert_eq!(line, OK);
    assert!(
        started.elapsed() >= Duration::from_secs(2),
        "sent before the decision"
    );
    assert_eq!(datagrams(&socket), 1);
    let requested = agent.wait_record("requested", Duration::from_secs(20), |r| {
        r["payload"]["request"]["target"]["kind"] == "connect"
            && r["payload"]["request"]["target"]["port"] == port
    });
    assert_eq!(
        requested["payload"]["request"]["target"]["socket_type"],
        "dgram"
    );
    drop(agent);

    let (socket, port) = udp_listener("127.0.0.1");
    let (cgroup, _agent) = gate_connect(
        "egress-udp-ask-deny",
        "default = \"ask\"",
        &on_timeout("2s", "deny"),
    );
    let lines = as_root_and_nobody(&cgroup, &["udp-send", "127.0.0.1", &port.to_string(), "1"]);
    assert_eq!(lines, [EPERM, EPERM]);
    assert_eq!(datagrams(&socket), 0);
}

#[test]
fn tcp_fast_open_to_a_denied_address_is_refused() {
    require_vm();
    let (denied, port) = loopback_listener();
    let (allowed, allowed_port) = loopback_listener();
    let (cgroup, _agent) = gate_connect(
        "egress-tfo",
        &format!("default = \"allow\"\ndeny = [\"127.0.0.1:{port}\"]"),
        "",
    );
    let lines = as_root_and_nobody(&cgroup, &["tfo", "127.0.0.1", &port.to_string()]);
    assert_eq!(
        lines,
        [EPERM, EPERM],
        "sendto(MSG_FASTOPEN) to a denied port"
    );
    assert_eq!(
        connections(&denied),
        0,
        "connections that reached the denied port"
    );
    // The same call to an allowed port connects: it is a connect.
    let lines = as_root_and_nobody(&cgroup, &["tfo", "127.0.0.1", &allowed_port.to_string()]);
    assert_eq!(lines, [OK, OK]);
    assert_eq!(connections(&allowed), 2);
}

#[test]
fn raw_and_packet_sockets_are_refused_by_default() {
    require_vm();
    // Outside the gated cgroup root makes them (the control).
    assert_eq!(line_of(None, &["net", "raw-icmp"]), OK);
    assert_eq!(line_of(None, &["net", "packet"]), OK);
    let (cgroup, agent) = gate_connect("egress-raw", "default = \"allow\"", "");
    for command in ["raw-icmp", "raw-icmp6", "packet"] {
        let lines = as_root_and_nobody(&cgroup, &[command]);
        assert_eq!(lines, [EPERM, EPERM], "{command}");
    }
    // Netlink sockets are SOCK_RAW by convention and talk to the kernel.
    assert_eq!(as_root_and_nobody(&cgroup, &["netlink-kernel"]), [OK, OK]);
    let record = agent.wait_record("kernel_denied", Duration::from_secs(20), |r| {
        r["payload"]["kind"] == "connect" && r["payload"]["target"]["socket_type"] == "raw"
    });
    assert_eq!(record["payload"]["rule"], "connect raw_sockets deny");
    assert_eq!(record["payload"]["kernel"]["call"], "socket");
    assert!(
        record["payload"]["target"]["address"]
            .as_str()
            .is_some_and(|a| a.starts_with("(new raw socket")),
        "{record}"
    );
}

#[test]
fn allowed_raw_sockets_still_meet_the_destination_rules() {
    require_vm();
    let (cgroup, _agent) = gate_connect(
        "egress-raw-allow",
        "default = \"allow\"\ndeny = [\"127.0.0.1\"]\nraw_sockets = \"allow\"",
        "",
    );
    let run = |command: &[&str]| line_of(Some(&cgroup), &[&["net"], command].concat());
    assert_eq!(run(&["raw-icmp"]), OK);
    assert_eq!(run(&["packet"]), OK);
    assert_eq!(run(&["raw-icmp", "127.0.0.1"]), EPERM);
    assert_eq!(run(&["raw-icmp", "0.0.0.0"]), EPERM);
    assert_eq!(run(&["raw-icmp", "127.0.0.2"]), OK);
}

#[test]
fn ping_sockets_to_a_denied_address_are_refused() {
    require_vm();
    allow_ping_sockets();
    let (cgroup, _agent) = gate_connect(
        "egress-ping",
        "default = \"deny\"\nallow = [\"127.0.0.2\", \"127.0.0.0/8:53\"]",
        "",
    );
    assert_eq!(
        as_root_and_nobody(&cgroup, &["ping", "127.0.0.2"]),
        [OK, OK]
    );
    assert_eq!(
        as_root_and_nobody(&cgroup, &["ping", "127.0.0.1"]),
        [EPERM, EPERM]
    );
    assert_eq!(
        as_root_and_nobody(&cgroup, &["ping", "0.0.0.0"]),
        [EPERM, EPERM]
    );
    // ICMP has no port: a port rule does not let an echo request through.
    assert_eq!(
        as_root_and_nobody(&cgroup, &["ping", "127.0.0.1", "53"]),
        [EPERM, EPERM]
    );
}

#[test]
fn unix_sockets_follow_the_connect_default() {
    require_vm();
    let (stream, stream_path, _a) = unix_listener(libc::SOCK_STREAM);
    let (dgram, dgram_path, _b) = unix_listener(libc::SOCK_DGRAM);
    let (cgroup, agent) = gate_connect("egress-unix", "default = \"deny\"", "");
    assert_eq!(
        as_root_and_nobody(&cgroup, &["unix-connect", &stream_path]),
        [EPERM, EPERM]
    );
    assert_eq!(
        as_root_and_nobody(&cgroup, &["unix-send", &dgram_path]),
        [EPERM, EPERM]
    );
    assert_eq!(messages(&dgram), 0, "unix datagrams that arrived");
    let mut pending = 0;
    // SAFETY: a plain non-blocking accept; the descriptor is closed at once.
    while let fd @ 0.. = unsafe {
        libc::accept(
            stream.as_raw_fd(),
            std::ptr::null_mut(),
            std::ptr::null_mut(),
        )
    } {
        // SAFETY: a descriptor accept just returned.
        unsafe { libc::close(fd) };
        pending += 1;
    }
    assert_eq!(pending, 0, "unix connections that arrived");
    let record = agent.wait_record("kernel_denied", Duration::from_secs(20), |r| {
        r["payload"]["kind"] == "connect" && r["payload"]["target"]["family"] == "unix"
    });
    assert_eq!(record["payload"]["rule"], "connect unix deny");
    drop(agent);

    // `unix` says otherwise: allowed.
    let (cgroup, _agent) = gate_connect(
        "egress-unix-allow",
        "default = \"deny\"\nunix = \"allow\"",
        "",
    );
    assert_eq!(
        as_root_and_nobody(&cgroup, &["unix-send", &dgram_path]),
        [OK, OK]
    );
    assert_eq!(messages(&dgram), 2);
}

/// A listening unix stream socket bound to the abstract name `name`.
fn abstract_listener(name: &str) -> std::os::unix::net::UnixListener {
    use std::os::{linux::net::SocketAddrExt as _, unix::net::SocketAddr};
    let address = SocketAddr::from_abstract_name(name).expect("abstract name");
    std::os::unix::net::UnixListener::bind_addr(&address).expect("bind abstract")
}

#[test]
fn unix_rules_decide_by_socket_path_and_abstract_name() {
    require_vm();
    let (_ok, ok_path, _a) = unix_listener(libc::SOCK_STREAM);
    let (_asked, asked_path, _b) = unix_listener(libc::SOCK_STREAM);
    let (_other, other_path, _c) = unix_listener(libc::SOCK_STREAM);
    let (_denied, denied_path, _d) = unix_listener(libc::SOCK_STREAM);
    let _abstract_ok = abstract_listener("gk-unix-ok");
    let _abstract_denied = abstract_listener("gk-unix-denied");
    let _abstract_other = abstract_listener("gk-unix-other");

    // Rules allow and ask; everything else gets `unix = "deny"`.
    let (cgroup, agent) = gate_connect(
        "egress-unix-rules",
        &format!(
            "default = \"allow\"\nunix = \"deny\"\n\
             allow = [\"unix:{ok_path}\", \"unix:@gk-unix-ok\"]\n\
             ask = [\"unix:{asked_path}\"]"
        ),
        &on_timeout("2s", "allow"),
    );
    let connect = |name: &str| as_root_and_nobody(&cgroup, &["unix-connect", name]);
    assert_eq!(connect(&ok_path), [OK, OK], "an allowed path connects");
    assert_eq!(connect("@gk-unix-ok"), [OK, OK], "an allowed abstract name");
    assert_eq!(connect(&other_path), [EPERM, EPERM], "another path: unix");
    assert_eq!(connect("@gk-unix-other"), [EPERM, EPERM], "another name");
    let record = agent.wait_record("kernel_denied", Duration::from_secs(20), |r| {
        r["payload"]["target"]["address"] == other_path.as_str()
    });
    assert_eq!(record["payload"]["rule"], "connect unix deny");
    // An asked path pauses until the reviewers' deadline (allow here).
    for (uid, who) in [(None, "root"), (Some(NOBODY), "nobody")] {
        let started = std::time::Instant::now();
        let mut args = uid.map_or_else(Vec::new, |uid| vec!["as-user", uid]);
        args.extend_from_slice(&["net", "unix-connect", &asked_path]);
        assert_eq!(line_of(Some(&cgroup), &args), OK, "{who}");
        assert!(
            started.elapsed() >= Duration::from_secs(2),
            "{who}: connected before the deadline"
        );
    }
    let requested = agent.wait_record("requested", Duration::from_secs(20), |r| {
        r["payload"]["request"]["target"]["address"] == asked_path.as_str()
    });
    assert_eq!(
        requested["payload"]["request"]["rule"],
        format!("connect ask unix:{asked_path}")
    );
    drop(agent);

    // Rules deny; everything else gets `unix = "allow"`.
    let (cgroup, agent) = gate_connect(
        "egress-unix-deny-rules",
        &format!(
            "default = \"deny\"\nunix = \"allow\"\n\
             deny = [\"unix:{denied_path}\", \"unix:@gk-unix-denied\"]"
        ),
        "",
    );
    let run = |command: &[&str]| as_root_and_nobody(&cgroup, command);
    assert_eq!(run(&["unix-connect", &denied_path]), [EPERM, EPERM]);
    assert_eq!(
        run(&["unix-connect-junk", &denied_path]),
        [EPERM, EPERM],
        "bytes after the path's NUL do not make another name"
    );
    assert_eq!(run(&["unix-connect", "@gk-unix-denied"]), [EPERM, EPERM]);
    assert_eq!(run(&["unix-connect", &other_path]), [OK, OK], "unix");
    assert_eq!(run(&["unix-connect", "@gk-unix-other"]), [OK, OK]);
    let record = agent.wait_record("kernel_denied", Duration::from_secs(20), |r| {
        r["payload"]["target"]["address"] == denied_path.as_str()
    });
    assert_eq!(
        record["payload"]["rule"],
        format!("connect deny unix:{denied_path}")
    );
}

#[test]
fn other_families_follow_the_connect_default() {
    require_vm();
    let (receiver, port_id) = netlink_listener();
    let (cgroup, agent) = gate_connect("egress-other", "default = \"deny\"", "");
    assert_eq!(
        as_root_and_nobody(&cgroup, &["netlink-send", &port_id.to_string()]),
        [EPERM, EPERM],
        "netlink to another process under connect.default = deny"
    );
    assert_eq!(messages(&receiver), 0, "netlink messages that arrived");
    // Netlink to the kernel is not egress.
    assert_eq!(as_root_and_nobody(&cgroup, &["netlink-kernel"]), [OK, OK]);
    let record = agent.wait_record("kernel_denied", Duration::from_secs(20), |r| {
        r["payload"]["kind"] == "connect" && r["payload"]["rule"] == "connect other_families deny"
    });
    assert_eq!(
        record["payload"]["target"]["address"],
        "(address family 16)"
    );
    drop(agent);

    let (cgroup, _agent) = gate_connect(
        "egress-other-allow",
        "default = \"deny\"\nother_families = \"allow\"",
        "",
    );
    assert_eq!(
        as_root_and_nobody(&cgroup, &["netlink-send", &port_id.to_string()]),
        [OK, OK]
    );
    assert_eq!(messages(&receiver), 2);
}

#[test]
fn tcp_fast_open_and_the_unspecified_address_cannot_reach_the_decision_service() {
    require_vm();
    let port: u16 = 17463;
    let cgroup_name = "gk-egress-service";
    let cgroup = gatekeep_tests::Cgroup::create(cgroup_name);
    let _agent = gatekeep_tests::Agent::start_with(
        "egress-service",
        &gatekeep_tests::policy::connect(cgroup_name, "default = \"allow\"", ""),
        &gatekeep_tests::embedded_decision(port),
    );
    let port_text = port.to_string();
    // Self-protection comes before the policy's `allow`, for every way in.
    assert_eq!(
        as_root_and_nobody(&cgroup, &["tfo", "127.0.0.1", &port_text]),
        [EPERM, EPERM],
        "sendto(MSG_FASTOPEN) to the decision service"
    );
    for ip in ["0.0.0.0", "127.0.0.1"] {
        let outcome = run_in(
            &cgroup,
            &["connect", ip, &port_text],
            Duration::from_mins(1),
        );
        assert_eq!(outcome, Outcome::connect_denied(), "connect to {ip}");
    }
    // From outside the gated cgroup the same calls reach it.
    assert_eq!(line_of(None, &["net", "tfo", "127.0.0.1", &port_text]), OK);
    assert_eq!(line_of(None, &["connect", "0.0.0.0", &port_text]), OK);
}
