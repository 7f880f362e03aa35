//! `cargo xtask demo [--auto]`: the approval flow for real. Boots the VM with the agent
//! (its embedded decision service on `SQLite`) and a scripted workload in a gated cgroup
//! that calls an internal HTTP API (`connect`) and runs a deploy script (`exec`); both
//! syscalls are paused. A reviewer then decides:
//!
//! - `--auto` (the default without a terminal, e.g. in CI): a script in the VM approves
//!   the connect through the web console's HTTP/JSON API, signed in as the console is
//!   (`gatekeep api --session`: session cookie and CSRF token; the VM has busybox but no
//!   curl, and the service speaks HTTP/2 over TLS only), after checking that an approval
//!   without the reason the policy requires is refused; it denies the exec with the CLI;
//! - interactive: the VM's decision service is forwarded to a port on the host's
//!   127.0.0.1; this command prints the console's address there and how to sign in (a
//!   reviewer token), and asks you, for each paused request, whether to approve or deny
//!   it, running the host's `gatekeep` CLI; the commands are printed so you can run them
//!   yourself from another terminal, or decide in the console instead. (The VM's serial
//!   console takes no input here, so the reviewer's side runs on the host.)
//!
//! Then the VM prints the workload's results, both audit exports (the agent's and the
//! service's) and verifies both hash chains. The demo fails if anything does not hold.

use std::{
    fs,
    io::{BufRead as _, IsTerminal as _, Write as _},
    os::unix::fs::PermissionsExt as _,
    path::{Path, PathBuf},
    process::Command,
    thread,
    time::Duration,
};

use anyhow::{Context as _, Result, bail};
use clap::Args;
use xtask::{
    PayloadFailed, display_cmd,
    vm::{self, Initramfs, Kernel, Payload, VmArgs},
};

/// The embedded decision service's port inside the VM.
const SERVICE_PORT: u16 = 7443;
/// What the VM prints around the facts the host's reviewer needs.
const CA_BEGIN: &str = "GATEKEEP-DEMO-CA-BEGIN";
const CA_END: &str = "GATEKEEP-DEMO-CA-END";
const TOKEN: &str = "GATEKEEP-DEMO-TOKEN: ";
const READY: &str = "GATEKEEP-DEMO-READY";

#[derive(Debug, Args)]
pub struct Options {
    /// Decide by script inside the VM (approve the connect, deny the exec) instead of
    /// asking you. The default when standard input is not a terminal.
    #[arg(long)]
    pub auto: bool,
    /// Give up (and kill the VM) after this many seconds.
    #[arg(long, default_value_t = 1200, value_name = "SECS")]
    pub timeout: u64,
    #[command(flatten)]
    pub vm: VmArgs,
}

/// The policy the security team wrote for the AI agent's cgroup.
const POLICY: &str = r#"# Policy of the demo: what the AI agent in cgroup /ai-agent may do.
[[policy]]
name = "ai-agent"
cgroups = ["/sys/fs/cgroup/ai-agent"]

[policy.exec]
default = "allow"
ask = ["/opt/demo/deploy.sh"]          # deploys need a human

[policy.connect]
default = "deny"
ask = ["127.0.0.1/32:8080"]            # the internal API needs a human

[policy.approval]
timeout = "10m"
on_timeout = "deny"
grant_durations = ["1h", "session"]
require_reason = true                  # approvers say why; it goes to the audit log
"#;

/// The agent's config: everything default (embedded decision service) but the host name,
/// and, for the interactive demo, a service reachable through QEMU's port forward.
fn agent_config(interactive: bool) -> String {
    let listen = if interactive { "0.0.0.0" } else { "127.0.0.1" };
    format!(
        "host = \"demo-host\"\nrescan_interval = \"500ms\"\nreconcile_interval = \"500ms\"\n\n\
         [decision]\nmode = \"embedded\"\nlisten = \"{listen}:{SERVICE_PORT}\"\n"
    )
}

/// The AI agent's work: a call to the internal API and a deploy, at once.
const WORKLOAD: &str = r#"#!/bin/sh
# The "AI agent": runs in the gated cgroup /ai-agent.
echo "workload: pid $$, cgroup $(cut -d: -f3 /proc/self/cgroup)"
(
    if body=$(wget -q -O - http://127.0.0.1:8080/status.txt 2>&1); then
        echo "connect 127.0.0.1:8080: ok, the API said: $body"
    else
        echo "connect 127.0.0.1:8080: failed: $body"
    fi
) &
(
    /opt/demo/deploy.sh --env prod
    echo "exec /opt/demo/deploy.sh: exit status $?"
) &
wait
"#;

const DEPLOY: &str = "#!/bin/sh\necho \"deploying to $2 ... done\"\n";

/// What runs in the VM (busybox sh).
const SCRIPT: &str = r#"#!/bin/sh
# gatekeep demo, run inside the VM by `cargo xtask demo` (xtask/src/demo.rs).
MODE=$1
AGENT_LOG=/var/log/gatekeep-agent.log
say() { printf '\n==> %s\n' "$*"; }
show() { printf '$ %s\n' "$*"; "$@"; }
fail() { echo "demo: FAILED: $*"; exit 1; }
pending_count() { gatekeep --output json review list | grep -o '"requested_at"' | wc -l; }
pending_id() { # KIND
    gatekeep --output json review list --kind "$1" \
        | sed -n 's/.*"id": *"\([0-9a-f-]*\)".*/\1/p' | head -n 1
}

mkdir -p /etc/gatekeep/policies /var/lib/gatekeep /var/log /srv/www /sys/fs/cgroup/ai-agent
cp /opt/demo/policy.toml /etc/gatekeep/policies/ai-agent.toml
cp /opt/demo/agent.toml /etc/gatekeep/agent.toml
echo "200 OK from the internal API" > /srv/www/status.txt
httpd -p 127.0.0.1:8080 -h /srv/www || fail "cannot start the demo API server"

say "The security team's policy (/etc/gatekeep/policies/ai-agent.toml)"
cat /etc/gatekeep/policies/ai-agent.toml
show gatekeep-agent policy validate /etc/gatekeep/policies

say "Starting the agent: BPF LSM programs, policy maps, embedded decision service"
cat /etc/gatekeep/agent.toml
gatekeep-agent run --ready-file /run/gatekeep.ready >"$AGENT_LOG" 2>&1 &
AGENT=$!
i=0
while [ ! -f /run/gatekeep.ready ]; do
    i=$((i + 1)); [ $i -gt 1200 ] && { cat "$AGENT_LOG"; fail "the agent did not start"; }
    kill -0 $AGENT 2>/dev/null || { cat "$AGENT_LOG"; fail "the agent exited"; }
    sleep 0.1
done
grep -E 'gatekeep agent ready|embedded decision service listening' "$AGENT_LOG"
export GATEKEEP_CLI_CONFIG=/var/lib/gatekeep/cli.toml
echo "reviewer CLI config: $GATEKEEP_CLI_CONFIG"

say "The AI agent (cgroup /ai-agent) calls the internal API and runs a deploy"
sh -c 'echo $$ > /sys/fs/cgroup/ai-agent/cgroup.procs && exec sh /opt/demo/workload.sh' >/tmp/workload.out 2>&1 &
WORKLOAD=$!
i=0
while [ "$(pending_count)" -lt 2 ]; do
    i=$((i + 1)); [ $i -gt 600 ] && { cat "$AGENT_LOG"; fail "the requests never reached the service"; }
    sleep 0.2
done
say "Both syscalls are paused in the kernel (the tasks are stopped, state T)"
show gatekeep-agent status
for pid in $(cat /sys/fs/cgroup/ai-agent/cgroup.procs); do
    printf '  pid %s %-10s %s\n' "$pid" "$(tr '\0' ' ' < /proc/$pid/cmdline | cut -c1-40)" "$(grep State /proc/$pid/status)"
done
grep 'request paused' "$AGENT_LOG"

say "What the reviewer sees"
show gatekeep review list
EXEC_ID=$(pending_id exec)
CONNECT_ID=$(pending_id connect)
show gatekeep review show "$EXEC_ID"

if [ "$MODE" = auto ]; then
    say "The reviewer decides (--auto): approve the API call through the console's HTTP API"
    echo "(gatekeep api --session signs in as the web console does: a session cookie from"
    echo " the reviewer token, its CSRF token on every change; then signs out)"
    show gatekeep api --session get "/api/v1/requests?kind=connect" >/tmp/queue.json || fail "the console's queue"
    grep -q "\"$CONNECT_ID\"" /tmp/queue.json || { cat /tmp/queue.json; fail "the console's queue lacks the connect"; }
    echo "the console's queue lists $CONNECT_ID"
    echo "An approval without a reason: the policy requires one (require_reason = true)"
    if show gatekeep api --session post "/api/v1/requests/$CONNECT_ID/decision" \
        --body '{"verdict": "allow"}'; then
        fail "an approval without a reason was accepted"
    fi
    show gatekeep api --session post "/api/v1/requests/$CONNECT_ID/decision" \
        --body '{"verdict": "allow", "reason": "read-only status call", "duration": "once"}' \
        >/tmp/decided.json || fail "approve through the console's API"
    grep -E '"state": "approved"|"decided_by"' /tmp/decided.json || { cat /tmp/decided.json; fail "not approved"; }
    say "... and denies the deploy with the CLI (a denial needs no reason)"
    show gatekeep review deny "$EXEC_ID" || fail "deny"
else
    echo "@CA_BEGIN@"
    cat /var/lib/gatekeep/pki/ca.pem
    echo "@CA_END@"
    echo "@TOKEN@$(cat /var/lib/gatekeep/reviewer.token)"
    echo "@READY@"
    say "Waiting for the reviewer on the host (the policy denies after 10 minutes)"
    while [ "$(pending_count)" -gt 0 ]; do sleep 1; done
fi

wait $WORKLOAD
say "The workload's view: the paused syscalls completed or failed with EPERM"
cat /tmp/workload.out
grep 'request decided' "$AGENT_LOG"

say "The agent's audit log (host, hash-chained): gatekeep-agent audit export"
gatekeep-agent audit export
show gatekeep-agent audit verify
say "The decision service's audit log: gatekeep audit export"
gatekeep audit export --format jsonl
show gatekeep audit verify

kill -TERM $AGENT
wait $AGENT
show gatekeep-agent audit verify || fail "the agent's audit chain"
show gatekeep audit verify --db /var/lib/gatekeep/service/audit.db || fail "the service's audit chain"
grep -q 'errno 513' /tmp/workload.out && fail "ERESTARTNOINTR leaked to user space"
if [ "$MODE" = auto ]; then
    grep -q 'connect 127.0.0.1:8080: ok' /tmp/workload.out || fail "the approved connect did not complete"
    grep -q 'deploy.sh.*not permitted' /tmp/workload.out || fail "the denied exec did not fail with EPERM"
    grep -q 'deploying' /tmp/workload.out && fail "the denied deploy ran"
fi
say "demo: OK"
"#;

/// Writes the demo's files into `dir` (copied to `/opt/demo` in the VM).
fn write_files(dir: &Path, interactive: bool) -> Result<()> {
    if dir.exists() {
        fs::remove_dir_all(dir).with_context(|| format!("cannot clear {}", dir.display()))?;
    }
    fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let script = SCRIPT
        .replace("@CA_BEGIN@", CA_BEGIN)
        .replace("@CA_END@", CA_END)
        .replace("@TOKEN@", TOKEN)
        .replace("@READY@", READY);
    let agent = agent_config(interactive);
    for (name, contents, mode) in [
        ("demo.sh", script.as_str(), 0o755),
        ("workload.sh", WORKLOAD, 0o755),
        ("deploy.sh", DEPLOY, 0o755),
        ("policy.toml", POLICY, 0o644),
        ("agent.toml", agent.as_str(), 0o644),
    ] {
        let path = dir.join(name);
        fs::write(&path, contents).with_context(|| format!("cannot write {}", path.display()))?;
        fs::set_permissions(&path, fs::Permissions::from_mode(mode))?;
    }
    Ok(())
}

/// A free TCP port on the host's 127.0.0.1.
fn free_port() -> Result<u16> {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").context("no free local port")?;
    Ok(listener.local_addr()?.port())
}

/// The host's side of the interactive demo: collects the CA and token the VM prints, then
/// asks the user about each pending request.
struct Reviewer {
    dir: PathBuf,
    cli: PathBuf,
    port: u16,
    ca: Option<String>,
    token: Option<String>,
}

impl Reviewer {
    fn cli_config(&self) -> PathBuf {
        self.dir.join("cli.toml")
    }

    /// Sees one console line; starts the prompt once the VM is ready.
    fn observe(&mut self, line: &str) {
        if line.contains(CA_BEGIN) {
            self.ca = Some(String::new());
        } else if line.contains(CA_END) {
            // Complete: kept as is.
        } else if let Some(ca) = self
            .ca
            .as_mut()
            .filter(|ca| !ca.contains("END CERTIFICATE"))
        {
            ca.push_str(line.trim());
            ca.push('\n');
        }
        if let Some((_, token)) = line.split_once(TOKEN) {
            self.token = Some(token.trim().to_owned());
        }
        if line.contains(READY) {
            match self.write_config() {
                Ok(()) => {
                    self.print_console();
                    let cli = self.cli.clone();
                    let config = self.cli_config();
                    thread::spawn(move || {
                        if let Err(err) = prompt(&cli, &config) {
                            eprintln!("[demo] reviewing failed: {err:#}");
                        }
                    });
                }
                Err(err) => eprintln!("[demo] cannot set up the reviewer's CLI: {err:#}"),
            }
        }
    }

    /// Where the web console of the VM's service is, and how to sign in to it.
    fn print_console(&self) {
        eprintln!("{}", self.console_notice());
    }

    fn console_notice(&self) -> String {
        format!(
            "\n[demo] The web console: https://127.0.0.1:{port}/console/\n\
             [demo]   Your browser must trust the service's CA, {ca} (or accept its warning).\n\
             [demo]   Sign in with a reviewer token (the embedded service allows it: \
             [console] token_sign_in = true): paste the `token` value of {config} into \
             \"Reviewer token\" and press \"Sign in with token\".\n\
             [demo]   Open a paused request, give a reason (this policy requires one to approve), \
             then Approve or Deny. The HTTP API: https://127.0.0.1:{port}/api/v1/openapi.json",
            port = self.port,
            ca = self.dir.join("ca.pem").display(),
            config = self.cli_config().display(),
        )
    }

    fn write_config(&self) -> Result<()> {
        let (Some(ca), Some(token)) = (&self.ca, &self.token) else {
            bail!("the VM did not print the service's CA and token");
        };
        fs::create_dir_all(&self.dir)?;
        let ca_path = self.dir.join("ca.pem");
        fs::write(&ca_path, ca)?;
        let config = format!(
            "server = \"https://127.0.0.1:{}\"\ntoken = \"{token}\"\nca = \"{}\"\n",
            self.port,
            ca_path.display()
        );
        let path = self.cli_config();
        fs::write(&path, config)?;
        fs::set_permissions(&path, fs::Permissions::from_mode(0o600))?;
        Ok(())
    }
}

fn gatekeep(cli: &Path, config: &Path, args: &[&str]) -> Command {
    let mut command = Command::new(cli);
    command.env("GATEKEEP_CLI_CONFIG", config).args(args);
    command
}

/// Asks about every pending request until none is left.
fn prompt(cli: &Path, config: &Path) -> Result<()> {
    eprintln!(
        "\n[demo] The VM's decision service is forwarded to this host. Decide here, or from \
         another terminal:\n[demo]   GATEKEEP_CLI_CONFIG={} {} review list\n",
        config.display(),
        cli.display()
    );
    let stdin = std::io::stdin();
    loop {
        let output = gatekeep(cli, config, &["--output", "json", "review", "list"])
            .output()
            .context("cannot run the gatekeep CLI")?;
        if !output.status.success() {
            bail!(
                "gatekeep review list failed: {}",
                String::from_utf8_lossy(&output.stderr)
            );
        }
        let pending: Vec<serde_json::Value> = serde_json::from_slice(&output.stdout)?;
        let Some(record) = pending.first() else {
            eprintln!("[demo] nothing left to decide");
            return Ok(());
        };
        let request = &record["request"];
        let id = request["id"].as_str().unwrap_or_default().to_owned();
        let target = &request["target"];
        let what = if target["kind"] == "exec" {
            let argv: Vec<&str> = target["argv"]
                .as_array()
                .map(|a| a.iter().filter_map(|v| v.as_str()).collect())
                .unwrap_or_default();
            format!(
                "exec {} ({})",
                target["executable"].as_str().unwrap_or("?"),
                argv.join(" ")
            )
        } else {
            format!(
                "connect {}:{}",
                target["address"].as_str().unwrap_or("?"),
                target["port"]
            )
        };
        eprint!(
            "\n[demo] paused: {what}\n[demo]   policy {}, host {}, pid {}, user {}\n[demo] approve, \
             deny, or show details? [a/d/s] ",
            request["policy"].as_str().unwrap_or("?"),
            record["host"].as_str().unwrap_or("?"),
            request["pid"],
            request["user_name"].as_str().unwrap_or("?"),
        );
        std::io::stderr().flush()?;
        let mut answer = String::new();
        if stdin.lock().read_line(&mut answer)? == 0 {
            bail!("standard input closed; the policy's timeout will decide");
        }
        let args: Vec<&str> = match answer.trim() {
            "a" | "approve" => vec!["review", "approve", &id, "--reason", "approved in the demo"],
            "d" | "deny" => vec!["review", "deny", &id, "--reason", "denied in the demo"],
            "s" | "show" => vec!["review", "show", &id],
            other => {
                eprintln!("[demo] `{other}`: answer a, d or s");
                continue;
            }
        };
        let mut command = gatekeep(cli, config, &args);
        eprintln!("$ {}", display_cmd(&command));
        let status = command.status().context("cannot run the gatekeep CLI")?;
        if !status.success() {
            eprintln!("[demo] the CLI failed ({status})");
        }
        thread::sleep(Duration::from_millis(300));
    }
}

pub fn run(opts: &Options) -> Result<()> {
    let interactive = !opts.auto && std::io::stdin().is_terminal();
    if !opts.auto && !interactive {
        eprintln!("[demo] standard input is not a terminal: deciding by script (--auto)");
    }
    let kernel = Kernel::load()?;
    let build = vm::build_for_vm(vm::Extras::None)?;
    let cli = build
        .binaries
        .iter()
        .find(|(name, _)| name == "gatekeep")
        .map(|(_, path)| path.clone())
        .context("the gatekeep CLI was not built")?;
    let files = vm::vm_dir().join("demo-files");
    write_files(&files, interactive)?;

    let initramfs = Initramfs::new("demo")?;
    initramfs.add_busybox()?;
    initramfs.add_modules(&kernel)?;
    for (name, path) in &build.binaries {
        initramfs.add_executable(path, name)?;
    }
    initramfs.add_payload_file(&files, Path::new("/opt/demo"))?;
    let initrd = initramfs.finish(&Payload {
        env: vec![("RUST_BACKTRACE".to_owned(), "1".to_owned())],
        argv: vec![
            "sh".to_owned(),
            "/opt/demo/demo.sh".to_owned(),
            if interactive { "interactive" } else { "auto" }.to_owned(),
        ],
    })?;

    let mut vm_args = opts.vm.clone();
    let mut reviewer = None;
    if interactive {
        let port = free_port()?;
        vm_args.net = true;
        vm_args.forward.push((port, SERVICE_PORT));
        reviewer = Some(Reviewer {
            dir: vm::vm_dir().join("demo-reviewer"),
            cli,
            port,
            ca: None,
            token: None,
        });
    }
    let code = vm::boot(
        &kernel,
        &initrd,
        &vm_args,
        Duration::from_secs(opts.timeout),
        &mut |line| {
            if let Some(reviewer) = reviewer.as_mut() {
                reviewer.observe(line);
            }
        },
    )?;
    if code != 0 {
        bail!(PayloadFailed {
            what: "the demo".to_owned(),
            code,
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_script_carries_the_markers_the_host_reads() {
        let dir = std::env::temp_dir().join(format!("gk-demo-test-{}", std::process::id()));
        write_files(&dir, true).expect("write");
        let script = fs::read_to_string(dir.join("demo.sh")).expect("script");
        assert!(script.contains(&format!("echo \"{CA_BEGIN}\"")), "{script}");
        assert!(script.contains(&format!(
            "echo \"{TOKEN}$(cat /var/lib/gatekeep/reviewer.token)\""
        )));
        assert!(script.contains(&format!("echo \"{READY}\"")));
        let agent = fs::read_to_string(dir.join("agent.toml")).expect("agent.toml");
        assert!(agent.contains("listen = \"0.0.0.0:7443\""), "{agent}");
        fs::remove_dir_all(&dir).expect("clean up");
    }

    #[test]
    fn the_reviewer_collects_the_ca_and_token_from_the_console() {
        let mut reviewer = Reviewer {
            dir: PathBuf::from("/nonexistent"),
            cli: PathBuf::from("gatekeep"),
            port: 1,
            ca: None,
            token: None,
        };
        for line in [
            "noise",
            CA_BEGIN,
            "-----BEGIN CERTIFICATE-----",
            "MIIB",
            "-----END CERTIFICATE-----",
            CA_END,
            "GATEKEEP-DEMO-TOKEN: gk_abc",
        ] {
            reviewer.observe(line);
        }
        assert_eq!(
            reviewer.ca.as_deref(),
            Some("-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n")
        );
        assert_eq!(reviewer.token.as_deref(), Some("gk_abc"));
        let notice = reviewer.console_notice();
        assert!(
            notice.contains("https://127.0.0.1:1/console/")
                && notice.contains("/nonexistent/ca.pem")
                && notice.contains("/nonexistent/cli.toml")
                && notice.contains("Sign in with token")
                && !notice.contains("gk_abc"),
            "the address and how to sign in, never the token itself: {notice}"
        );
    }
}
