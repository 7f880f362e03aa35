//! `gatekeep`: the reviewers' and administrators' command line.

mod api;
mod config;
mod escape;
mod forecast;
mod host_audit;
mod login;
mod notify;
mod output;
mod report;

use std::{io::Write as _, path::PathBuf, process::ExitCode};

use anyhow::{Context as _, anyhow, bail};
use clap::{Args, CommandFactory as _, Parser, Subcommand, ValueEnum};
use gatekeep_client::{ClientError, GrantFilter, HostRecords, RequestFilter, ReviewClient};
use gatekeep_proto::{
    GrantDuration,
    model::{GrantScope, Kind, Verdict},
};
use tokio_stream::StreamExt as _;
use uuid::Uuid;

use crate::{
    config::Connection,
    output::{Format, Printer},
};

/// Review and decide paused actions, manage grants, check audit logs and policies.
///
/// Server address, token and CA come from flags, the environment (GATEKEEP_SERVER,
/// GATEKEEP_TOKEN, GATEKEEP_CA) or ~/.config/gatekeep/cli.toml (`server`, `token`, `ca`).
#[derive(Debug, Parser)]
#[command(name = "gatekeep", version)]
#[expect(clippy::doc_markdown, reason = "clap help text, shown as written")]
struct Cli {
    #[command(flatten)]
    connection: config::ConnectionArgs,
    /// Output format.
    #[arg(long, short, global = true, value_enum, default_value_t = Format::Text)]
    output: Format,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Review paused requests.
    #[command(subcommand)]
    Review(ReviewCommand),
    /// List and revoke standing grants.
    #[command(subcommand)]
    Grants(GrantsCommand),
    /// Verify or export an audit log (a local database, or the service's).
    #[command(subcommand)]
    Audit(AuditCommand),
    /// Check policy files.
    #[command(subcommand)]
    Policy(PolicyCommand),
    /// Write a per-policy compliance summary of the service's audit log over a time window.
    #[command(verbatim_doc_comment)]
    Report(ReportArgs),
    /// Show the service's state and who you are to it.
    Status,
    /// Sign in with the service's identity provider (OpenID Connect device flow) and keep
    /// the session's token in the CLI config.
    Login,
    /// Call the service's HTTP/JSON API (the console's; routes at /api/v1/openapi.json)
    /// and print its JSON answer, e.g. `gatekeep api post
    /// /api/v1/requests/ID/decision --body '{"verdict": "allow", "reason": "ticket 42"}'`.
    Api(api::ApiArgs),
    /// The notifications the service gave up on, and delivering them again
    /// (administrators).
    #[command(subcommand)]
    Notify(notify::NotifyCommand),
    /// Print shell completions.
    Completions { shell: clap_complete::Shell },
}

#[derive(Debug, Args)]
struct Filter {
    /// Only requests from this host.
    #[arg(long)]
    host: Option<String>,
    /// Only requests of this policy.
    #[arg(long)]
    policy: Option<String>,
    /// Only exec or connect requests.
    #[arg(long, value_enum)]
    kind: Option<KindArg>,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum KindArg {
    Exec,
    Connect,
}

impl From<&Filter> for RequestFilter {
    fn from(filter: &Filter) -> Self {
        RequestFilter {
            host: filter.host.clone(),
            policy: filter.policy.clone(),
            kind: filter.kind.map(|kind| match kind {
                KindArg::Exec => Kind::Exec,
                KindArg::Connect => Kind::Connect,
            }),
        }
    }
}

#[derive(Debug, Args)]
#[group(multiple = false)]
struct DurationArgs {
    /// Also allow the same action for this long (e.g. 30m, 1h), if the policy allows it.
    #[arg(long = "for", value_name = "DURATION")]
    for_: Option<String>,
    /// Also allow it until the workload's cgroup goes away.
    #[arg(long)]
    session: bool,
    /// Also allow it until the grant is revoked.
    #[arg(long)]
    always: bool,
}

/// Whom a grant covers.
#[derive(Debug, Clone, Copy, ValueEnum)]
enum ScopeArg {
    /// Only the workload (cgroup) that asked.
    Workload,
    /// Every workload the policy gates on the host.
    Policy,
}

impl From<ScopeArg> for GrantScope {
    fn from(scope: ScopeArg) -> Self {
        match scope {
            ScopeArg::Workload => GrantScope::Workload,
            ScopeArg::Policy => GrantScope::Policy,
        }
    }
}

impl DurationArgs {
    fn duration(&self) -> anyhow::Result<GrantDuration> {
        if self.session {
            return Ok(GrantDuration::Session);
        }
        if self.always {
            return Ok(GrantDuration::Always);
        }
        match &self.for_ {
            None => Ok(GrantDuration::Once),
            Some(text) => match text.parse::<GrantDuration>() {
                Ok(GrantDuration::For(length)) => Ok(GrantDuration::For(length)),
                Ok(_) | Err(_) => bail!("--for takes a duration such as 30m or 1h, not `{text}`"),
            },
        }
    }
}

#[derive(Debug, Subcommand)]
enum ReviewCommand {
    /// List pending requests, oldest first.
    List {
        #[command(flatten)]
        filter: Filter,
    },
    /// Show pending requests, then every new or changed one, until interrupted.
    Watch {
        #[command(flatten)]
        filter: Filter,
    },
    /// Show one request with its full context and similar past decisions.
    Show {
        /// Request id, or any unique prefix of it (at least 4 hex digits; `review list` shows
        /// short ones).
        id: String,
    },
    /// Approve a request.
    Approve {
        /// Request id, or any unique prefix of it (at least 4 hex digits; `review list` shows
        /// short ones).
        id: String,
        #[command(flatten)]
        duration: DurationArgs,
        /// Whom a grant (--for, --session, --always) covers: only the workload (cgroup) that
        /// asked, or every workload of the policy. A session grant is always the workload's.
        #[arg(long, value_enum, default_value = "workload")]
        scope: ScopeArg,
        /// Why (recorded in the audit log).
        #[arg(long, default_value = "")]
        reason: String,
    },
    /// Deny a request.
    Deny {
        /// Request id, or any unique prefix of it (at least 4 hex digits; `review list` shows
        /// short ones).
        id: String,
        /// Why (recorded in the audit log).
        #[arg(long, default_value = "")]
        reason: String,
    },
    /// Withdraw a pending request; the paused action is denied.
    Cancel {
        /// Request id, or any unique prefix of it (at least 4 hex digits; `review list` shows
        /// short ones).
        id: String,
        #[arg(long, default_value = "")]
        reason: String,
    },
}

#[derive(Debug, Subcommand)]
enum GrantsCommand {
    /// List grants in force.
    List {
        #[arg(long)]
        host: Option<String>,
        #[arg(long)]
        policy: Option<String>,
        /// Also revoked and expired grants.
        #[arg(long)]
        all: bool,
    },
    /// Revoke a grant; its agent removes it.
    Revoke {
        /// Grant id, or any unique prefix of it (at least 4 hex digits).
        id: String,
        #[arg(long, default_value = "")]
        reason: String,
    },
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum ExportFormat {
    /// JSON Lines, one record per line.
    Jsonl,
}

/// Write a per-policy compliance summary of the service's audit log over a time window.
///
/// For each policy: requests, approvals (and who approved), denials, expiries,
/// cancellations, abandoned requests, median and p95 time to decision, self-approvals
/// refused, grants created and revoked. The audit chain is verified from its first record
/// first; a broken or altered log is refused with an error and no report. The verified
/// chain head (seq and hash) is printed with the figures, to compare with an anchored copy.
///
/// The log comes from the service (its API, with your reviewer token), from the service's
/// SQLite audit database (--db), or from a JSON Lines export of the whole log (--input,
/// e.g. `gatekeep audit export > audit.jsonl` of a PostgreSQL fleet).
///
/// --from and --to take an RFC 3339 time (2026-01-31T09:00:00Z) or a date in UTC; --from
/// is inclusive, --to exclusive, and a --to date includes that whole day.
///
/// Examples:
///   gatekeep report --from 2026-01-01 --to 2026-03-31 --format html --out q1.html
///   gatekeep report --from 2026-03-01T00:00:00Z --to 2026-03-08T00:00:00Z --format csv
///   gatekeep report --db /var/lib/gatekeep-server/audit.db --from 2026-03-01 --to 2026-03-31
#[derive(Debug, Args)]
#[expect(clippy::doc_markdown, reason = "clap help text, shown as written")]
struct ReportArgs {
    /// Start of the window (inclusive): RFC 3339 time or date.
    #[arg(long, value_name = "TIME")]
    from: String,
    /// End of the window (exclusive; a date means the end of that day).
    #[arg(long, value_name = "TIME")]
    to: String,
    #[arg(long, value_enum, default_value_t = report::ReportFormat::Json)]
    format: report::ReportFormat,
    /// Write the report here instead of to stdout.
    #[arg(long, value_name = "FILE")]
    out: Option<PathBuf>,
    /// The service's audit database (SQLite), read-only, instead of asking the service.
    #[arg(long, value_name = "PATH", conflicts_with = "input")]
    db: Option<PathBuf>,
    /// A JSON Lines export of the whole log, instead of asking the service.
    #[arg(long, value_name = "FILE")]
    input: Option<PathBuf>,
}

#[derive(Debug, Subcommand)]
enum AuditCommand {
    /// Prove the hash chain of an audit log.
    ///
    /// With --host, check a host's log against what its agent shipped to the service: the
    /// service reports the anchored head and any divergence it saw; with --db as well (run on
    /// the host), the local log is proved and compared record by record. Exit status 1 when
    /// the log was rewritten, truncated or rolled back (the message names the seq).
    Verify {
        /// A local audit database (the agent's or the service's); the service's through its
        /// API when left out.
        #[arg(long)]
        db: Option<PathBuf>,
        /// The host (its certificate's name) whose anchored log to check.
        #[arg(long)]
        host: Option<String>,
    },
    /// Write an audit log as JSON Lines to stdout.
    Export {
        #[arg(long)]
        db: Option<PathBuf>,
        #[arg(long, value_enum, default_value_t = ExportFormat::Jsonl)]
        format: ExportFormat,
        /// Only records from this seq on.
        #[arg(long)]
        from_seq: Option<u64>,
        /// The service's export only: after its own chain, every host's shipped records
        /// (lines with `"anchored_host"`).
        #[arg(long, conflicts_with_all = ["db", "host"])]
        all_hosts: bool,
        /// The service's export only: this host's shipped records alone (one chain;
        /// --from-seq counts in it).
        #[arg(long, conflicts_with = "db")]
        host: Option<String>,
    },
}

#[derive(Debug, Subcommand)]
#[expect(
    clippy::doc_markdown,
    clippy::doc_link_with_quotes,
    reason = "clap help text, shown as written"
)]
enum PolicyCommand {
    /// Validate policy files (or directories of them), reporting every problem with its line
    /// and column, and warning where a valid policy cannot keep its promise on this host.
    ///
    /// Warnings (on stderr, one per line: `warning[KIND]: FILE:LINE:COLUMN: cause; fix`; in
    /// `--output json`, the document's `warnings` array) are checked against this host's
    /// files:
    ///   deny-list-under-allow  deny/ask exec rules under `default = "allow"`: a copy or
    ///                          rebuild of the program escapes them
    ///   missing-path           a rule names a file that does not exist here
    ///   not-a-file             a rule names a directory or special file
    ///   unreadable             a rule's file could not be read to check it
    ///   script                 a deny/ask rule names a script (or a non-ELF file): an
    ///                          interpreter outside `interpreters` runs it without exec'ing
    ///                          it, and a listed one still reads `sh < FILE`
    ///   unlisted-mappings-under-allow-list
    ///                          an allow-list that lets unlisted files be mapped as code
    ///   host-deny-list-under-allow
    ///                          deny/ask host-name rules under connect `default = "allow"`:
    ///                          a hard-coded address or DNS over HTTPS escapes them
    ///
    /// Exit status: 0 the files are valid (warnings alone do not fail); 1 a file is invalid
    /// or cannot be read; 2 wrong command-line usage; 3 the files are valid but have
    /// warnings and --deny-warnings was given.
    #[command(verbatim_doc_comment)]
    Validate {
        #[arg(required = true)]
        paths: Vec<PathBuf>,
        /// Fail (exit status 3) when any warning is found.
        #[arg(long)]
        deny_warnings: bool,
    },
    /// Show what policies in audit mode would have denied and asked, from an agent's audit log.
    ///
    /// A policy with `mode = "audit"` denies and pauses nothing: the agent records each action
    /// enforcement would have denied or asked about (`audited` records, one per burst of
    /// identical actions, with a count). This sums them over a time window, per policy and
    /// rule, and lists the commands and destinations that would have asked most often, so a
    /// policy can be tuned before it enforces. Switching a policy to `mode = "enforce"` is a
    /// reload of the agent's policies.
    ///
    ///   gatekeep policy forecast --db /var/lib/gatekeep/audit.db --since 7d
    #[command(verbatim_doc_comment)]
    Forecast {
        /// The agent's audit database (read-only).
        #[arg(
            long,
            value_name = "PATH",
            default_value = "/var/lib/gatekeep/audit.db"
        )]
        db: PathBuf,
        /// The window: records from this long ago until now (e.g. 1h, 24h, 7d).
        #[arg(long, value_name = "DURATION", default_value = "24h")]
        since: String,
        /// How many of the most frequent asked targets to list per policy.
        #[arg(long, default_value_t = 10)]
        top: usize,
    },
    /// Check that policies give example actions the outcomes you expect (like `opa test`).
    ///
    /// Each CASES path is a file, or a directory whose `*.cases.toml` files are read. A cases
    /// file holds one [[case]] per example action:
    ///
    ///   [[case]]
    ///   name = "agents may not use sudo"        # optional
    ///   cgroup = "/sys/fs/cgroup/agents/job-1"  # the workload's cgroup
    ///   exec = "/usr/bin/sudo"                  # an exec...
    ///   argv = ["sudo", "-i"]                   # ...and its argv (default: [exec])
    ///   expect = "deny"                         # allow | deny | ask
    ///
    ///   [[case]]
    ///   cgroup = "/sys/fs/cgroup/agents/job-1"
    ///   connect = "169.254.169.254:80"          # IP:PORT or [IPv6]:PORT (also sendto)
    ///   expect = "deny"
    ///
    ///   [[case]]
    ///   cgroup = "/sys/fs/cgroup/agents/job-1"
    ///   unix = "/run/docker.sock"               # AF_UNIX; "@name" for an abstract socket
    ///   expect = "ask"
    ///
    /// Each case is decided as the kernel would, before any reviewer acts: the policy
    /// governing the cgroup (none: allow), the exec rule naming the file (by identity when
    /// the file exists on this host, by path otherwise) and a script's `#!` interpreter,
    /// `on_truncated` for an asked exec whose argv the kernel cannot bind, the connect rules
    /// (most specific first), the `unix` action. Grants, and gatekeep's self-protections
    /// (which refuse whatever the policy says), are not modelled.
    ///
    /// `*.cases.toml` files can sit in the policy directory: the agent does not load them as
    /// policies. So `gatekeep policy test --policies DIR DIR` tests a directory's policies
    /// with its own cases.
    ///
    /// Exit status: 0 every case got its expected outcome; 1 a policy or cases file is
    /// invalid or cannot be read; 2 wrong command-line usage; 4 a case got another outcome.
    #[command(verbatim_doc_comment)]
    Test {
        /// Cases files, or directories of `*.cases.toml` files.
        #[arg(required = true, value_name = "CASES")]
        cases: Vec<PathBuf>,
        /// Policy files or directories to test (as for `policy validate`).
        #[arg(long, value_name = "PATH", default_value = "/etc/gatekeep/policies")]
        policies: Vec<PathBuf>,
    },
}

/// `policy test` found cases whose outcome was not the expected one: exit status 4.
#[derive(Debug, thiserror::Error)]
#[error(
    "{failed} of {total} case(s) did not get the expected outcome; fix the policy, or the expectation if the policy is right"
)]
struct CasesFailed {
    failed: usize,
    total: usize,
}

/// The exit status of `policy test` when a case fails.
const EXIT_CASES_FAILED: u8 = 4;

/// `policy validate --deny-warnings` found warnings: exit status 3.
#[derive(Debug, thiserror::Error)]
#[error(
    "the policy files are valid but have {count} warning(s), and --deny-warnings makes that a failure; fix them (each says how) or drop --deny-warnings"
)]
struct WarningsDenied {
    count: usize,
}

/// The exit status of `policy validate` when `--deny-warnings` finds warnings.
const EXIT_WARNINGS: u8 = 3;

/// A policy or cases file that could not be loaded: one diagnostic per line,
/// file names and quoted text escaped; I/O errors with their cause.
fn policy_error(what: &str, error: &gatekeep_policy::PolicyError) -> anyhow::Error {
    if error.diagnostics().is_empty() {
        let cause = std::error::Error::source(error)
            .map(|source| format!(": {source}"))
            .unwrap_or_default();
        return anyhow!(
            "{}{}",
            escape::terminal(&error.to_string()),
            escape::terminal(&cause)
        )
        .context(format!("cannot load the {what} files"));
    }
    let lines: Vec<String> = error
        .to_string()
        .lines()
        .map(|line| escape::terminal(line).into_owned())
        .collect();
    anyhow!("{}", lines.join("\n"))
}

/// Turns a client error into a message that names the cause and the fix.
fn explain(error: ClientError, connection: &Connection) -> anyhow::Error {
    use tonic::Code;
    match &error {
        ClientError::Connect { endpoint, source } => {
            let mut cause = source.to_string();
            let mut next = std::error::Error::source(source);
            while let Some(inner) = next {
                cause = format!("{cause}: {inner}");
                next = inner.source();
            }
            anyhow!(
                "cannot reach the decision service at {endpoint} ({cause}); check that it runs there and that --server / GATEKEEP_SERVER and the CA (--ca / GATEKEEP_CA, now {}) are right",
                connection.ca.display()
            )
        }
        ClientError::Status { status } => match status.code() {
            Code::Unauthenticated => anyhow!(
                "the service refused your token: {}; pass a valid one with --token or GATEKEEP_TOKEN",
                status.message()
            ),
            Code::NotFound => anyhow!(
                "{}; list pending requests with `gatekeep review list`",
                status.message()
            ),
            Code::Unavailable => anyhow!(
                "the decision service at {} is unavailable: {}",
                connection.server,
                status.message()
            ),
            _ => anyhow!("{}", status.message()),
        },
        ClientError::Config { .. } | ClientError::InvalidAnswer { .. } => anyhow!(error),
    }
}

struct App {
    connection: Connection,
    client: Option<ReviewClient>,
    printer: Printer,
}

impl App {
    async fn client(&mut self) -> anyhow::Result<&mut ReviewClient> {
        if self.client.is_none() {
            let config = self.connection.review_config()?;
            let client = ReviewClient::connect(config)
                .await
                .map_err(|err| explain(err, &self.connection))?;
            self.client = Some(client);
        }
        self.client
            .as_mut()
            .ok_or_else(|| anyhow!("no connection to the decision service"))
    }

    /// `gatekeep audit ...`.
    async fn audit(&mut self, command: AuditCommand) -> anyhow::Result<()> {
        match command {
            AuditCommand::Verify {
                db,
                host: Some(host),
            } => {
                let verdict =
                    host_audit::verify(self.client().await?, &host, db.as_deref()).await?;
                self.printer.host_verify(&verdict)?;
                if verdict.diverged() {
                    return Err(anyhow!(
                        "host `{host}`'s audit log diverges from what it shipped"
                    ));
                }
                Ok(())
            }
            AuditCommand::Verify {
                db: Some(db),
                host: None,
            } => {
                let report = gatekeep_audit::verify(&db)
                    .with_context(|| format!("audit log `{}` does not verify", db.display()))?;
                self.printer.local_verify(&db, &report)
            }
            AuditCommand::Verify {
                db: None,
                host: None,
            } => {
                let report = self.client().await?.verify_audit().await;
                let report = report.map_err(|err| self.explain(err))?;
                self.printer.remote_verify(&report)
            }
            AuditCommand::Export {
                db,
                format: ExportFormat::Jsonl,
                from_seq,
                all_hosts,
                host,
            } => {
                let stdout = std::io::stdout();
                let mut out = stdout.lock();
                if let Some(db) = db {
                    let filter = gatekeep_audit::ExportFilter {
                        from_seq,
                        kind: None,
                    };
                    gatekeep_audit::export(&db, &mut out, &filter)
                        .with_context(|| format!("cannot export `{}`", db.display()))?;
                } else {
                    let mut buffer = Vec::new();
                    let hosts = match (all_hosts, host) {
                        (_, Some(host)) => HostRecords::One(host),
                        (true, None) => HostRecords::All,
                        (false, None) => HostRecords::None,
                    };
                    let exported = self
                        .client()
                        .await?
                        .export_audit_hosts(from_seq.unwrap_or(0), hosts, &mut buffer)
                        .await;
                    exported.map_err(|err| self.explain(err))?;
                    out.write_all(&buffer)?;
                }
                out.flush()?;
                Ok(())
            }
        }
    }

    fn explain(&self, error: ClientError) -> anyhow::Error {
        explain(error, &self.connection)
    }

    /// A full request id, or the one request (pending or past) whose id starts with `text`:
    /// the service resolves prefixes, and names the candidates when several match.
    async fn resolve(&mut self, text: &str) -> anyhow::Result<Uuid> {
        if let Ok(id) = Uuid::try_parse(text) {
            return Ok(id);
        }
        gatekeep_proto::id::normalize_prefix(text)?;
        let resolved = self.client().await?.resolve_request_id(text).await;
        resolved.map_err(|err| self.explain(err))
    }

    /// A full grant id, or the one grant (active or not) whose id starts with `text`.
    async fn resolve_grant(&mut self, text: &str) -> anyhow::Result<Uuid> {
        if let Ok(id) = Uuid::try_parse(text) {
            return Ok(id);
        }
        gatekeep_proto::id::normalize_prefix(text)?;
        let filter = GrantFilter {
            host: None,
            policy: None,
            include_inactive: true,
        };
        let grants = self.client().await?.list_grants(&filter).await;
        let grants = grants.map_err(|err| self.explain(err))?;
        gatekeep_proto::id::resolve_prefix(text, "grant", grants.iter().map(|grant| grant.id))
            .map_err(|err| anyhow!("{err}; see `gatekeep grants list --all`"))
    }

    async fn run(&mut self, command: Command) -> anyhow::Result<()> {
        match command {
            Command::Review(review) => self.review(review).await,
            Command::Grants(GrantsCommand::List { host, policy, all }) => {
                let filter = GrantFilter {
                    host,
                    policy,
                    include_inactive: all,
                };
                let grants = self.client().await?.list_grants(&filter).await;
                let grants = grants.map_err(|err| self.explain(err))?;
                self.printer.grants(&grants)
            }
            Command::Grants(GrantsCommand::Revoke { id, reason }) => {
                let id = self.resolve_grant(&id).await?;
                let grant = self.client().await?.revoke_grant(id, &reason).await;
                let grant = grant.map_err(|err| self.explain(err))?;
                self.printer.grant_revoked(&grant)
            }
            Command::Audit(command) => self.audit(command).await,
            Command::Policy(command) => self.policy(command),
            Command::Report(args) => self.report(args).await,
            Command::Status => {
                let status = self.client().await?.status().await;
                let status = status.map_err(|err| self.explain(err))?;
                self.printer.status(&self.connection.server, &status)
            }
            Command::Login => {
                let file = self.connection.file.clone().ok_or_else(|| {
                    anyhow!("no CLI config file to keep the token in: pass --cli-config FILE")
                })?;
                let session = login::login(&self.connection, |url, code| {
                    eprintln!(
                        "To sign in, open {url}\nand check that it shows the code {code}.\nWaiting for the sign-in..."
                    );
                })
                .await?;
                login::save_token(&file, &session)?;
                eprintln!(
                    "Signed in as {} (groups: {}) until {}; the token is in {}",
                    escape::terminal(&session.reviewer),
                    escape::terminal(&session.groups.join(", ")),
                    session.expires_at,
                    file.display()
                );
                Ok(())
            }
            Command::Api(args) => api::run(&self.connection, &args).await,
            Command::Notify(command) => {
                notify::run(&self.connection, &command, self.printer.is_json()).await
            }
            Command::Completions { shell } => {
                clap_complete::generate(
                    shell,
                    &mut Cli::command(),
                    "gatekeep",
                    &mut std::io::stdout(),
                );
                Ok(())
            }
        }
    }

    /// `report`: reads and verifies the log, then writes the summary.
    async fn report(&mut self, args: ReportArgs) -> anyhow::Result<()> {
        let from = report::parse_time("--from", &args.from, false)?;
        let to = report::parse_time("--to", &args.to, true)?;
        report::check_window(from, to)?;
        let export = if let Some(db) = &args.db {
            let verified = gatekeep_audit::verify(db)
                .map_err(|source| report::ReportError::Broken { source })
                .with_context(|| format!("audit log `{}`", db.display()))?;
            report::check_guards(&verified)?;
            let mut lines = Vec::new();
            gatekeep_audit::export(db, &mut lines, &gatekeep_audit::ExportFilter::default())
                .with_context(|| format!("cannot read the audit log `{}`", db.display()))?;
            lines
        } else if let Some(input) = &args.input {
            std::fs::read(input)
                .with_context(|| format!("cannot read the export `{}`", input.display()))?
        } else {
            let mut lines = Vec::new();
            let exported = self.client().await?.export_audit(0, &mut lines).await;
            exported.map_err(|err| self.explain(err))?;
            lines
        };
        let built = report::Report::build(&export, from, to)?;
        if let Some(path) = &args.out {
            let file = std::fs::File::create(path)
                .with_context(|| format!("cannot create `{}`", path.display()))?;
            let mut file = std::io::BufWriter::new(file);
            built.write(args.format, &mut file)?;
            file.flush()
                .with_context(|| format!("cannot write `{}`", path.display()))?;
        } else {
            let stdout = std::io::stdout();
            let mut out = stdout.lock();
            built.write(args.format, &mut out)?;
            out.flush()?;
        }
        Ok(())
    }

    /// `policy validate` and `policy test`: local, no service needed.
    fn policy(&self, command: PolicyCommand) -> anyhow::Result<()> {
        match command {
            PolicyCommand::Validate {
                paths,
                deny_warnings,
            } => {
                let validation = gatekeep_policy::validate_paths(&paths)
                    .map_err(|error| policy_error("policy", &error))?;
                let failed = deny_warnings && !validation.warnings.is_empty();
                self.printer.policy_validated(&validation, !failed)?;
                if failed {
                    return Err(WarningsDenied {
                        count: validation.warnings.len(),
                    }
                    .into());
                }
                Ok(())
            }
            PolicyCommand::Forecast { db, since, top } => {
                let window = humantime::parse_duration(&since).map_err(|err| {
                    anyhow!("--since takes a duration such as 24h or 7d, not `{since}` ({err})")
                })?;
                let until = time::OffsetDateTime::now_utc();
                let from = until - window;
                let mut lines = Vec::new();
                let filter = gatekeep_audit::ExportFilter {
                    from_seq: None,
                    kind: Some(gatekeep_audit::RecordKind::Audited),
                };
                gatekeep_audit::export(&db, &mut lines, &filter)
                    .with_context(|| format!("cannot read the audit log `{}`", db.display()))?;
                let mut records = Vec::new();
                for line in lines.split(|&byte| byte == b'\n').filter(|l| !l.is_empty()) {
                    let record: gatekeep_audit::StoredRecord = serde_json::from_slice(line)
                        .context("the audit log holds a record this version cannot read")?;
                    records.push((record.at, record.payload));
                }
                let found = forecast::forecast(
                    records.iter().map(|(at, payload)| (*at, payload)),
                    from,
                    until,
                    top,
                );
                self.printer.forecast(&found, &since)
            }
            PolicyCommand::Test { cases, policies } => {
                let loaded = gatekeep_policy::PolicySet::load_paths(&policies)
                    .map_err(|error| policy_error("policy", &error))?;
                let cases = gatekeep_policy::load_cases(&cases)
                    .map_err(|error| policy_error("cases", &error))?;
                let results = loaded.run_cases(cases);
                self.printer.policy_tested(&results)?;
                let failed = results.iter().filter(|result| !result.passed).count();
                if failed > 0 {
                    return Err(CasesFailed {
                        failed,
                        total: results.len(),
                    }
                    .into());
                }
                Ok(())
            }
        }
    }

    async fn review(&mut self, command: ReviewCommand) -> anyhow::Result<()> {
        match command {
            ReviewCommand::List { filter } => {
                let listed = self
                    .client()
                    .await?
                    .list_pending(&(&filter).into(), 0)
                    .await;
                let requests = listed.map_err(|err| self.explain(err))?;
                self.printer.requests(&requests)
            }
            ReviewCommand::Watch { filter } => {
                let watched = self.client().await?.watch(&(&filter).into()).await;
                let mut stream = Box::pin(watched.map_err(|err| self.explain(err))?);
                while let Some(event) = stream.next().await {
                    let (initial, record) = event.map_err(|err| self.explain(err))?;
                    self.printer.watch_event(initial, &record)?;
                }
                Ok(())
            }
            ReviewCommand::Show { id } => {
                let id = self.resolve(&id).await?;
                let shown = self.client().await?.get(id).await;
                let (record, similar) = shown.map_err(|err| self.explain(err))?;
                self.printer.request(&record, &similar)
            }
            ReviewCommand::Approve {
                id,
                duration,
                scope,
                reason,
            } => {
                let duration = duration.duration()?;
                let id = self.resolve(&id).await?;
                let decided = self
                    .client()
                    .await?
                    .decide_scoped(id, Verdict::Allow, &reason, duration, scope.into())
                    .await;
                let record = decided.map_err(|err| self.explain(err))?;
                self.printer.decided(&record)
            }
            ReviewCommand::Deny { id, reason } => {
                let id = self.resolve(&id).await?;
                let decided = self
                    .client()
                    .await?
                    .decide(id, Verdict::Deny, &reason, GrantDuration::Once)
                    .await;
                let record = decided.map_err(|err| self.explain(err))?;
                self.printer.decided(&record)
            }
            ReviewCommand::Cancel { id, reason } => {
                let id = self.resolve(&id).await?;
                let cancelled = self.client().await?.cancel(id, &reason).await;
                let record = cancelled.map_err(|err| self.explain(err))?;
                self.printer.decided(&record)
            }
        }
    }
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    let needs_server = matches!(
        cli.command,
        Command::Review(_)
            | Command::Grants(_)
            | Command::Status
            | Command::Login
            | Command::Api(_)
            | Command::Notify(_)
            | Command::Audit(
                AuditCommand::Verify { db: None, .. }
                    | AuditCommand::Verify { host: Some(_), .. }
                    | AuditCommand::Export { db: None, .. }
            )
            | Command::Report(ReportArgs {
                db: None,
                input: None,
                ..
            })
    );
    let result = async {
        let connection = if needs_server {
            cli.connection.resolve(config::default_file().as_ref())?
        } else {
            Connection::offline()
        };
        let mut app = App {
            connection,
            client: None,
            printer: Printer::new(cli.output),
        };
        app.run(cli.command).await
    }
    .await;
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("gatekeep: {error:#}");
            if error.downcast_ref::<WarningsDenied>().is_some() {
                ExitCode::from(EXIT_WARNINGS)
            } else if error.downcast_ref::<CasesFailed>().is_some() {
                ExitCode::from(EXIT_CASES_FAILED)
            } else {
                ExitCode::FAILURE
            }
        }
    }
}
