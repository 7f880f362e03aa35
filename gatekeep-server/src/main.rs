//! `gatekeep-server`: run the decision service, mint certificates, manage reviewers.

use std::{
    path::{Path, PathBuf},
    sync::Arc,
};

use anyhow::Context as _;
use clap::{Parser, Subcommand, ValueEnum};
use gatekeep_server::{
    Server, ServerConfig, certs, paths,
    store::{self, Store},
};

/// glibc's malloc spent about a quarter of the service's CPU under load on arena locks and
/// consolidation (perf, 100 agents); mimalloc halved the CPU per decision (80 -> 44 us).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// gatekeep's decision service: agents stream paused requests in, reviewers decide.
#[derive(Debug, Parser)]
#[command(version)]
struct Cli {
    /// Configuration file (TOML); missing keys take their defaults.
    #[arg(long, short, global = true, env = "GATEKEEP_SERVER_CONFIG", default_value = paths::CONFIG_FILE)]
    config: PathBuf,
    /// Log format.
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Text)]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the service until SIGINT or SIGTERM.
    Serve {
        /// Listen address, overriding the config's `listen`.
        #[arg(long, env = "GATEKEEP_SERVER_LISTEN")]
        listen: Option<std::net::SocketAddr>,
        /// Data directory, overriding the config's `data_dir`.
        #[arg(long, env = "GATEKEEP_SERVER_DATA_DIR")]
        data_dir: Option<PathBuf>,
        /// TLS directory holding ca.pem, server.pem and server.key (as written by
        /// `certs init`), overriding the config's `[tls]`.
        #[arg(long)]
        tls_dir: Option<PathBuf>,
    },
    /// Make certificates for a quick start.
    #[command(subcommand)]
    Certs(CertsCommand),
    /// Manage reviewers and their tokens.
    #[command(subcommand)]
    Reviewers(ReviewersCommand),
}

#[derive(Debug, Subcommand)]
enum CertsCommand {
    /// Write a new CA and server certificate (ca.pem, ca.key, server.pem, server.key).
    Init {
        /// Directory to write into (created if needed; existing files are never overwritten).
        #[arg(long)]
        dir: PathBuf,
        /// Extra names (DNS names or IP addresses) of the server, besides localhost and the
        /// loopback addresses.
        #[arg(long = "name")]
        names: Vec<String>,
    },
    /// Issue an agent client certificate (agent-HOST.pem, agent-HOST.key) from the CA in DIR.
    Agent {
        /// Directory holding ca.pem and ca.key.
        #[arg(long)]
        dir: PathBuf,
        /// The agent's host name; the service identifies the agent by it.
        #[arg(long)]
        name: String,
        /// Where to write the files (default: DIR).
        #[arg(long)]
        out: Option<PathBuf>,
    },
}

#[derive(Debug, Subcommand)]
enum ReviewersCommand {
    /// Add a reviewer and print their token (shown once; only its hash is stored).
    Add {
        name: String,
        /// Reviewer group (repeat for several); policies name the groups that may decide.
        #[arg(long = "group")]
        groups: Vec<String>,
        /// State database, overriding the config's `data_dir`/state.db.
        #[arg(long)]
        db: Option<PathBuf>,
    },
    /// List reviewers and their groups.
    List {
        #[arg(long)]
        db: Option<PathBuf>,
    },
    /// Remove a reviewer (their token stops working at once).
    Remove {
        name: String,
        #[arg(long)]
        db: Option<PathBuf>,
    },
}

fn load_config(path: &Path) -> anyhow::Result<ServerConfig> {
    if path.exists() {
        Ok(ServerConfig::load(path)?)
    } else if path == Path::new(paths::CONFIG_FILE) {
        // No config file at the default place: every default applies.
        Ok(ServerConfig::default())
    } else {
        anyhow::bail!(
            "config file `{}` does not exist; create it or leave out --config",
            path.display()
        )
    }
}

fn init_logging(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}

async fn shutdown_signal() {
    let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
        Ok(term) => term,
        Err(error) => {
            tracing::warn!(%error, "cannot watch SIGTERM; only SIGINT stops the service");
            drop(tokio::signal::ctrl_c().await);
            return;
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
}

/// The configured store (`--db` names another `SQLite` file instead).
async fn open_store(config: &Path, db: Option<PathBuf>) -> anyhow::Result<Arc<dyn Store>> {
    let mut config = load_config(config)?;
    if db.is_some() {
        config.store.url = None;
    }
    let path = db.unwrap_or_else(|| config.state_db());
    if config.store.url.is_none()
        && let Some(parent) = path.parent()
    {
        std::fs::create_dir_all(parent)
            .with_context(|| format!("cannot create `{}`", parent.display()))?;
    }
    Ok(store::open(&config.store, path, config.synchronous).await?)
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    init_logging(cli.log_format);
    match cli.command {
        Command::Serve {
            listen,
            data_dir,
            tls_dir,
        } => {
            let mut config = load_config(&cli.config)?;
            if let Some(listen) = listen {
                config.listen = listen;
            }
            if let Some(dir) = data_dir {
                config.data_dir = dir;
            }
            if let Some(dir) = tls_dir {
                config.tls = gatekeep_server::config::TlsPaths {
                    ca: dir.join(paths::CA_CERT),
                    cert: dir.join(paths::SERVER_CERT),
                    key: dir.join(paths::SERVER_KEY),
                };
            }
            let server = Server::builder(config).build().await?;
            server.serve(shutdown_signal()).await?;
        }
        Command::Certs(CertsCommand::Init { dir, names }) => {
            for file in certs::init_dir(&dir, &names)? {
                println!("wrote {}", file.display());
            }
        }
        Command::Certs(CertsCommand::Agent { dir, name, out }) => {
            for file in certs::agent_files(&dir, &name, out.as_deref())? {
                println!("wrote {}", file.display());
            }
        }
        Command::Reviewers(ReviewersCommand::Add { name, groups, db }) => {
            let store = open_store(&cli.config, db).await?;
            let token = gatekeep_server::add_reviewer(&*store, &name, &groups).await?;
            eprintln!("added reviewer `{name}`; their token (shown once, keep it secret):");
            println!("{token}");
        }
        Command::Reviewers(ReviewersCommand::List { db }) => {
            let store = open_store(&cli.config, db).await?;
            for reviewer in store.list_reviewers().await? {
                println!("{}\t{}", reviewer.name, reviewer.groups.join(","));
            }
        }
        Command::Reviewers(ReviewersCommand::Remove { name, db }) => {
            let store = open_store(&cli.config, db).await?;
            if !store.remove_reviewer(name.clone()).await? {
                anyhow::bail!("no reviewer `{name}`");
            }
            println!("removed reviewer `{name}`");
        }
    }
    Ok(())
}
