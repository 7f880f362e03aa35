//! A real OpenID provider (`oidc-provider`, npm) run with Node.js on loopback, and where
//! `cargo xtask setup` installed it (`target/node`).

use std::{
    io::{BufRead as _, BufReader},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::Duration,
};

use gatekeep_server::auth::oidc::OidcConfig;

/// The client the provider knows gatekeep as.
pub const CLIENT_ID: &str = "gatekeep-console";
pub const CLIENT_SECRET: &str = "test-secret-not-for-production";
/// The public client `gatekeep login` uses (device flow).
pub const CLI_CLIENT_ID: &str = "gatekeep-cli";

/// `target/node`: `node_modules` with oidc-provider and playwright-core, and the scripts.
pub fn node_dir() -> PathBuf {
    let target = std::env::var_os("CARGO_TARGET_DIR").map_or_else(
        || Path::new(env!("CARGO_MANIFEST_DIR")).join("../target"),
        PathBuf::from,
    );
    let dir = target.join("node");
    assert!(
        dir.join("node_modules/oidc-provider").is_dir()
            && dir.join("node_modules/playwright-core").is_dir(),
        "the console tests need oidc-provider and playwright-core in {}: run `cargo xtask setup` (it runs `npm ci` there from gatekeep-server/tests/browser)",
        dir.display()
    );
    dir
}

/// Copies a script of `tests/browser` next to `node_modules` (ES modules resolve packages
/// from the script's own folder) and returns its path.
pub fn script(name: &str) -> PathBuf {
    let dir = node_dir();
    // From this crate's tests or another's (gatekeep-cli's includes this file).
    let source = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../gatekeep-server/tests/browser")
        .join(name);
    let dest = dir.join(name);
    std::fs::copy(&source, &dest).expect("copy the test script next to node_modules");
    dest
}

pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .expect("bind")
        .local_addr()
        .expect("addr")
        .port()
}

/// A running provider; killed on drop.
pub struct Idp {
    child: Child,
    pub issuer: String,
    pub port: u16,
}

impl Idp {
    /// Starts a provider on `port` signing with the keys in `keys_file` (made if missing),
    /// sending users back to `redirect_uri`. A port another process holds for a moment is
    /// tried again a few times.
    pub fn start(port: u16, keys_file: &Path, redirect_uri: &str) -> Self {
        let mut last = String::new();
        for _ in 0..10 {
            match Self::spawn(port, keys_file, redirect_uri) {
                Ok(idp) => return idp,
                Err(why) => last = why,
            }
            std::thread::sleep(Duration::from_millis(300));
        }
        panic!("the OpenID provider does not start on port {port}: {last}");
    }

    /// Starts a provider on a free port (another one if the first was taken meanwhile by
    /// a process of a test running beside this one).
    pub fn start_any(keys_file: &Path, redirect_uri: &str) -> Self {
        let mut last = String::new();
        for _ in 0..10 {
            match Self::spawn(free_port(), keys_file, redirect_uri) {
                Ok(idp) => return idp,
                Err(why) => last = why,
            }
        }
        panic!("the OpenID provider does not start: {last}");
    }

    /// One attempt: the provider once it prints READY, or why it ended before (its stderr).
    fn spawn(port: u16, keys_file: &Path, redirect_uri: &str) -> Result<Self, String> {
        let script = script("provider.mjs");
        let mut child = Command::new("node")
            .arg(&script)
            .current_dir(node_dir())
            .env("PORT", port.to_string())
            .env("CLIENT_ID", CLIENT_ID)
            .env("CLIENT_SECRET", CLIENT_SECRET)
            .env("REDIRECT_URIS", redirect_uri)
            .env("KEYS_FILE", keys_file)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start node (Node.js is installed by `cargo xtask setup`)");
        let stdout = child.stdout.take().expect("stdout");
        let mut stderr = child.stderr.take().expect("stderr");
        let (ready, wait) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if let Some(issuer) = line.strip_prefix("READY ") {
                    drop(ready.send(issuer.to_owned()));
                }
            }
        });
        let complaint = std::thread::spawn(move || {
            let mut text = String::new();
            drop(std::io::Read::read_to_string(&mut stderr, &mut text));
            text
        });
        match wait.recv_timeout(Duration::from_secs(30)) {
            Ok(issuer) => Ok(Self {
                child,
                issuer,
                port,
            }),
            Err(why) => {
                drop(child.kill());
                drop(child.wait());
                let stderr = complaint.join().unwrap_or_default();
                Err(format!("{why}; its stderr: {}", stderr.trim()))
            }
        }
    }

    /// The console's `[console.oidc]` for this provider, for a service at `service`.
    pub fn config(&self, service: std::net::SocketAddr) -> OidcConfig {
        OidcConfig {
            issuer: self.issuer.clone(),
            client_id: CLIENT_ID.to_owned(),
            client_secret: Some(CLIENT_SECRET.to_owned()),
            client_secret_file: None,
            redirect_url: format!("https://{service}/auth/oidc/callback"),
            display_name: "Test IdP".to_owned(),
            groups_claim: "groups".to_owned(),
            scopes: vec!["email".into(), "profile".into(), "groups".into()],
            ca_file: None,
            cli_client_id: Some(CLI_CLIENT_ID.to_owned()),
        }
    }
}

impl Drop for Idp {
    fn drop(&mut self) {
        drop(self.child.kill());
        drop(self.child.wait());
    }
}
