//! `gatekeep-bench worker`: the measured loops. Each run is a fresh process that first
//! moves itself into the cgroup of the setup (so that its own exec is not gated), then
//! runs the loop and prints one JSON line with what it measured.

use std::{
    ffi::CString,
    io::{BufRead as _, Write as _},
    net::{SocketAddr, TcpStream, UdpSocket},
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail, ensure};
use serde::{Deserialize, Serialize};

use crate::report::trimmed_mean;

/// Options of `gatekeep-bench worker`.
#[derive(Debug, clap::Args)]
pub struct WorkerOptions {
    /// The cgroup (directory) to move into before the loop.
    #[arg(long)]
    pub cgroup: PathBuf,
    /// Untimed iterations first.
    #[arg(long, default_value_t = 0)]
    pub warmup: usize,
    /// Report every iteration's time, not just the total.
    #[arg(long)]
    pub samples: bool,
    #[command(subcommand)]
    pub action: Action,
}

#[derive(Debug, clap::Subcommand)]
pub enum Action {
    /// fork + exec of `program` (no arguments but its name), `count` times; each must exit 0.
    Exec { count: usize, program: PathBuf },
    /// TCP connect + close to `addr`, `count` times; each must connect.
    Connect { count: usize, addr: SocketAddr },
    /// A 16-byte UDP datagram to `addr` from one unconnected socket, `count` times; each
    /// must be sent.
    Sendto { count: usize, addr: SocketAddr },
    /// Serves loops on request, for as long as stdin stays open: each line `exec <warmup>
    /// <count>` (fork + exec of `program`), `connect <warmup> <count>` (to `addr`) or
    /// `kill <warmup> <count>` (`kill(own pid, 0)`), `open <warmup> <count>` (open, read
    /// and close `program`), `stat <warmup> <count>` (`stat` of `program`), `sendto
    /// <warmup> <count>` (a UDP datagram to `addr`'s port on an unconnected socket) or `mmap
    /// <warmup> <count>` (`program`'s first page mapped with `PROT_EXEC`, then unmapped) or
    /// `dns <warmup> <count>` (a DNS query to port 53 of `addr`'s address, and its answer)
    /// is answered with one report line. One process for a whole benchmark, moved from cgroup to
    /// cgroup, so setups alternate without starting processes.
    Serve { program: PathBuf, addr: SocketAddr },
    /// Connects to `addr` that gatekeep denies, paced at `rate` per second for `seconds`;
    /// each must fail with EPERM.
    Denied {
        rate: u32,
        seconds: f64,
        addr: SocketAddr,
    },
}

/// What a worker prints.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct WorkerReport {
    /// Timed iterations.
    pub count: usize,
    pub total_ns: u64,
    /// Per-iteration times when asked for.
    pub samples_ns: Vec<u64>,
    /// Mean time of the fastest quarter of the iterations (`serve` only, see
    /// [`TRIMMED_KEEP`]): under TCG a timer tick costs a fork + exec about 20 %, and
    /// a third of them take one; host preemptions land anywhere. The fastest ones carry
    /// gatekeep's cost like every other, without those.
    #[serde(default)]
    pub trimmed_mean_ns: f64,
}

impl WorkerReport {
    /// Mean time of one iteration (ns).
    #[must_use]
    pub fn mean_ns(&self) -> f64 {
        #[expect(clippy::cast_precision_loss, reason = "a mean")]
        let mean = self.total_ns as f64 / self.count.max(1) as f64;
        mean
    }

    /// Iterations per second.
    #[must_use]
    pub fn rate(&self) -> f64 {
        #[expect(clippy::cast_precision_loss, reason = "a rate")]
        let rate = self.count as f64 / (self.total_ns.max(1) as f64 / 1e9);
        rate
    }
}

fn nanos(duration: Duration) -> u64 {
    u64::try_from(duration.as_nanos()).unwrap_or(u64::MAX)
}

/// Forks and execs `program` with `argv = [name]` and an empty environment; waits for it.
fn fork_exec(program: &CString, argv: &[*const libc::c_char; 2]) -> Result<()> {
    let envp: [*const libc::c_char; 1] = [std::ptr::null()];
    // SAFETY: the child only calls execve and _exit (async-signal-safe) on memory prepared
    // before the fork; this process has a single thread.
    let pid = unsafe { libc::fork() };
    if pid < 0 {
        bail!("fork failed: {}", std::io::Error::last_os_error());
    }
    if pid == 0 {
        // SAFETY: see above; `_exit` never returns.
        unsafe {
            libc::execve(program.as_ptr(), argv.as_ptr(), envp.as_ptr());
            libc::_exit(127);
        }
    }
    let mut status = 0;
    // SAFETY: waits for our own child.
    if unsafe { libc::waitpid(pid, &raw mut status, 0) } != pid {
        bail!("waitpid failed: {}", std::io::Error::last_os_error());
    }
    if !libc::WIFEXITED(status) || libc::WEXITSTATUS(status) != 0 {
        bail!("the exec'd program failed (wait status {status}): was the exec refused?");
    }
    Ok(())
}

/// Runs the loop `opts` names and prints its [`WorkerReport`] as JSON.
pub fn run(opts: &WorkerOptions) -> Result<()> {
    std::fs::write(opts.cgroup.join("cgroup.procs"), "0")
        .with_context(|| format!("cannot move into {}", opts.cgroup.display()))?;
    let report = match &opts.action {
        Action::Exec { count, program } => exec_loop(program, opts.warmup, *count, opts.samples)?,
        Action::Connect { count, addr } => connect_loop(*addr, opts.warmup, *count, opts.samples)?,
        Action::Sendto { count, addr } => {
            timed(opts.warmup, *count, opts.samples, sendto_op(*addr)?)?
        }
        Action::Serve { program, addr } => return serve(program, *addr),
        Action::Denied {
            rate,
            seconds,
            addr,
        } => paced_denied(*rate, *seconds, *addr)?,
    };
    let mut stdout = std::io::stdout().lock();
    serde_json::to_writer(&mut stdout, &report)?;
    writeln!(stdout)?;
    Ok(())
}

/// One fork + exec of `program`.
fn exec_op(program: &Path) -> Result<impl FnMut() -> Result<()>> {
    let path = CString::new(program.as_os_str().as_encoded_bytes())?;
    let name = CString::new("gk-true")?;
    Ok(move || {
        let argv = [name.as_ptr(), std::ptr::null()];
        fork_exec(&path, &argv)
    })
}

/// One TCP connect + close to `addr`.
fn connect_op(addr: SocketAddr) -> impl FnMut() -> Result<()> {
    move || {
        let stream = TcpStream::connect(addr).with_context(|| format!("connect {addr}"))?;
        drop(stream);
        Ok(())
    }
}

/// One `sendto` of 16 bytes to `addr` on an unconnected UDP socket made once (the
/// `socket_sendmsg` hook: a datagram with a destination gets the connect decision). Nothing
/// needs to listen: the datagram is sent whether or not a port takes it.
fn sendto_op(addr: SocketAddr) -> Result<impl FnMut() -> Result<()>> {
    let bind: SocketAddr = if addr.is_ipv4() {
        "127.0.0.1:0".parse()?
    } else {
        "[::1]:0".parse()?
    };
    let socket = UdpSocket::bind(bind).context("bind a UDP socket")?;
    let payload = [0x5a_u8; 16];
    Ok(move || {
        socket
            .send_to(&payload, addr)
            .with_context(|| format!("sendto {addr}"))?;
        Ok(())
    })
}

/// The DNS query of the `dns` loop: id 0x4242, recursion desired, one
/// question `api.bench.test` type A class IN (RFC 1035, 4.1).
pub const DNS_QUERY: [u8; 32] = [
    0x42, 0x42, 0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0, 3, b'a', b'p', b'i', 5, b'b', b'e', b'n', b'c',
    b'h', 4, b't', b'e', b's', b't', 0, 0, 1, 0, 1,
];

/// The DNS resolver port the `dns` loop queries on `addr`'s address.
pub const DNS_PORT: u16 = 53;

/// One DNS query (`sendto` of [`DNS_QUERY`] on an unconnected UDP socket made once, to
/// port 53 of `addr`'s address) and its answer (`recv`): what a resolver library does.
/// The benchmark's responder ([`answer_dns`]) must listen there.
fn dns_op(addr: SocketAddr) -> Result<impl FnMut() -> Result<()>> {
    let resolver = SocketAddr::new(addr.ip(), DNS_PORT);
    let bind: SocketAddr = if addr.is_ipv4() {
        "127.0.0.1:0".parse()?
    } else {
        "[::1]:0".parse()?
    };
    let socket = UdpSocket::bind(bind).context("bind a UDP socket")?;
    socket.set_read_timeout(Some(std::time::Duration::from_secs(10)))?;
    let mut answer = [0u8; 512];
    Ok(move || {
        socket
            .send_to(&DNS_QUERY, resolver)
            .with_context(|| format!("DNS query to {resolver}"))?;
        let len = socket
            .recv(&mut answer)
            .with_context(|| format!("DNS answer from {resolver}"))?;
        ensure!(len > DNS_QUERY.len(), "short DNS answer ({len} bytes)");
        Ok(())
    })
}

/// The answer to a query (as [`DNS_QUERY`]): the query with the response flags and one A
/// record (127.0.0.2, TTL 60) for the question name.
#[must_use]
pub fn answer_dns(query: &[u8]) -> Vec<u8> {
    let mut answer = query.to_vec();
    if answer.len() < 12 {
        return answer;
    }
    // QR, RD, RA; NOERROR; one answer.
    answer[2] = 0x81;
    answer[3] = 0x80;
    answer[6] = 0;
    answer[7] = 1;
    // The question name by pointer (offset 12), A, IN, TTL 60, 4 bytes.
    answer.extend_from_slice(&[0xc0, 12, 0, 1, 0, 1, 0, 0, 0, 60, 0, 4, 127, 0, 0, 2]);
    answer
}

/// One `kill(own pid, 0)`: the signal permission check (the `task_kill` hook) and
/// nothing delivered.
fn kill_op() -> impl FnMut() -> Result<()> {
    // SAFETY: getpid has no preconditions.
    let pid = unsafe { libc::getpid() };
    move || {
        // SAFETY: signal 0 to ourselves only checks permission.
        if unsafe { libc::kill(pid, 0) } != 0 {
            bail!("kill(own pid, 0): {}", std::io::Error::last_os_error());
        }
        Ok(())
    }
}

/// One open + read of up to 64 bytes + close of `path` (the `file_open` and
/// `file_permission` hooks).
fn open_op(path: &Path) -> Result<impl FnMut() -> Result<()>> {
    let path = CString::new(path.as_os_str().as_encoded_bytes())?;
    let mut buf = [0u8; 64];
    Ok(move || {
        // SAFETY: a NUL-terminated path; the descriptor is closed below.
        let fd = unsafe { libc::open(path.as_ptr(), libc::O_RDONLY | libc::O_CLOEXEC) };
        if fd < 0 {
            bail!("open: {}", std::io::Error::last_os_error());
        }
        // SAFETY: reads into a buffer of its length.
        let read = unsafe { libc::read(fd, buf.as_mut_ptr().cast(), buf.len()) };
        // SAFETY: our own descriptor.
        unsafe { libc::close(fd) };
        if read <= 0 {
            bail!("read: {}", std::io::Error::last_os_error());
        }
        Ok(())
    })
}

/// One `stat` of `path` (the path walk and `inode_getattr`).
/// One `mmap` of `path`'s first page with `PROT_READ | PROT_EXEC` and its `munmap` (the
/// `mmap_file` hook: a file mapped as code meets its exec rules), on a descriptor opened
/// once.
fn mmap_op(path: &Path) -> Result<impl FnMut() -> Result<()>> {
    let file = std::fs::File::open(path).with_context(|| format!("open {}", path.display()))?;
    Ok(move || {
        let fd = std::os::fd::AsRawFd::as_raw_fd(&file);
        // SAFETY: a private mapping of one page of an open file, never touched, unmapped
        // below.
        let at = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                4096,
                libc::PROT_READ | libc::PROT_EXEC,
                libc::MAP_PRIVATE,
                fd,
                0,
            )
        };
        if at == libc::MAP_FAILED {
            bail!("mmap: {}", std::io::Error::last_os_error());
        }
        // SAFETY: the page mapped above.
        unsafe { libc::munmap(at, 4096) };
        Ok(())
    })
}

fn stat_op(path: &Path) -> Result<impl FnMut() -> Result<()>> {
    let path = CString::new(path.as_os_str().as_encoded_bytes())?;
    Ok(move || {
        // SAFETY: a NUL-terminated path and a stat buffer of the right type.
        let mut stat = unsafe { std::mem::zeroed::<libc::stat>() };
        // SAFETY: as above.
        if unsafe { libc::stat(path.as_ptr(), &raw mut stat) } != 0 {
            bail!("stat: {}", std::io::Error::last_os_error());
        }
        Ok(())
    })
}

fn exec_loop(program: &Path, warmup: usize, count: usize, samples: bool) -> Result<WorkerReport> {
    timed(warmup, count, samples, exec_op(program)?)
}

fn connect_loop(
    addr: SocketAddr,
    warmup: usize,
    count: usize,
    samples: bool,
) -> Result<WorkerReport> {
    timed(warmup, count, samples, connect_op(addr))
}

/// The share of the fastest iterations a `serve` report's trimmed means keep.
pub const TRIMMED_KEEP: f64 = 0.25;

/// The `serve` loop: one request line in, one report line out, until end of input.
fn serve(program: &Path, addr: SocketAddr) -> Result<()> {
    let mut stdout = std::io::stdout().lock();
    for line in std::io::stdin().lock().lines() {
        let line = line?;
        let words: Vec<&str> = line.split_whitespace().collect();
        let (what, warmup, count) = match words.as_slice() {
            [] => continue,
            [what, warmup, count] => (*what, warmup.parse()?, count.parse()?),
            _ => bail!("unreadable request `{line}`"),
        };
        let report = match what {
            "exec" => trimmed(warmup, count, exec_op(program)?)?,
            "connect" => trimmed(warmup, count, connect_op(addr))?,
            "kill" => trimmed(warmup, count, kill_op())?,
            "open" => trimmed(warmup, count, open_op(program)?)?,
            "stat" => trimmed(warmup, count, stat_op(program)?)?,
            "sendto" => trimmed(warmup, count, sendto_op(addr)?)?,
            "mmap" => trimmed(warmup, count, mmap_op(program)?)?,
            "dns" => trimmed(warmup, count, dns_op(addr)?)?,
            _ => bail!("unknown loop `{what}`"),
        };
        serde_json::to_writer(&mut stdout, &report)?;
        writeln!(stdout)?;
        stdout.flush()?;
    }
    Ok(())
}

/// `warmup` untimed then `count` timed calls of `once`, each timed alone; the report
/// carries their trimmed mean.
fn trimmed(warmup: usize, count: usize, once: impl FnMut() -> Result<()>) -> Result<WorkerReport> {
    let mut report = timed(warmup, count, true, once)?;
    report.trimmed_mean_ns = trimmed_mean(&mut report.samples_ns, TRIMMED_KEEP);
    report.samples_ns = Vec::new();
    Ok(report)
}

fn timed(
    warmup: usize,
    count: usize,
    with_samples: bool,
    mut once: impl FnMut() -> Result<()>,
) -> Result<WorkerReport> {
    for _ in 0..warmup {
        once()?;
    }
    let mut samples = Vec::with_capacity(if with_samples { count } else { 0 });
    let started = Instant::now();
    for _ in 0..count {
        if with_samples {
            let begun = Instant::now();
            once()?;
            samples.push(nanos(begun.elapsed()));
        } else {
            once()?;
        }
    }
    Ok(WorkerReport {
        count,
        total_ns: nanos(started.elapsed()),
        samples_ns: samples,
        trimmed_mean_ns: 0.0,
    })
}

/// Denied connects at `rate` per second (in 1 ms slices, catching up when behind).
fn paced_denied(rate: u32, seconds: f64, addr: SocketAddr) -> Result<WorkerReport> {
    let duration = Duration::from_secs_f64(seconds);
    let started = Instant::now();
    let mut done: u64 = 0;
    loop {
        let elapsed = started.elapsed();
        if elapsed >= duration {
            break;
        }
        #[expect(
            clippy::cast_possible_truncation,
            clippy::cast_sign_loss,
            reason = "a count of connects, far below 2^53"
        )]
        let due = (elapsed.as_secs_f64() * f64::from(rate)) as u64;
        if done >= due {
            std::thread::sleep(Duration::from_micros(500));
            continue;
        }
        while done < due {
            match TcpStream::connect(addr) {
                Err(err) if err.raw_os_error() == Some(libc::EPERM) => done += 1,
                Err(err) => bail!("connect {addr}: expected EPERM, got {err}"),
                Ok(_) => bail!("connect {addr} was not denied: is the policy loaded?"),
            }
        }
    }
    Ok(WorkerReport {
        count: usize::try_from(done)?,
        total_ns: nanos(started.elapsed()),
        samples_ns: Vec::new(),
        trimmed_mean_ns: 0.0,
    })
}
