//! A `gatekeep-server serve` child process, as the native and the in-VM benchmarks both
//! run it: the shipped binary (its allocator, its runtime), its files in one folder.

use std::{
    net::{SocketAddr, TcpStream},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail, ensure};

/// A running service; killed when dropped unless [`stop`](Self::stop)ped.
pub struct ServerProcess {
    child: Child,
    log: PathBuf,
    pub listen: SocketAddr,
}

impl ServerProcess {
    /// Starts `binary` on `listen` with the configuration `config_toml`, its databases in
    /// `dir/data` and its certificates in `dir/tls` (made by the caller); logs at
    /// `rust_log` to `dir/service.log`. Returns once it accepts connections.
    pub fn start(
        binary: &Path,
        dir: &Path,
        config_toml: &str,
        listen: SocketAddr,
        rust_log: &str,
    ) -> Result<Self> {
        Self::start_under(&[], binary, dir, config_toml, listen, rust_log)
    }

    /// [`start`](Self::start), with `binary` run by `wrapper` (a command and its
    /// arguments, e.g. valgrind's), when it is not empty.
    pub fn start_under(
        wrapper: &[String],
        binary: &Path,
        dir: &Path,
        config_toml: &str,
        listen: SocketAddr,
        rust_log: &str,
    ) -> Result<Self> {
        let config = dir.join("server.toml");
        std::fs::write(&config, config_toml)?;
        let log = dir.join("service.log");
        let output = std::fs::File::create(&log)?;
        let mut command = match wrapper.split_first() {
            Some((program, args)) => {
                let mut command = Command::new(program);
                command.args(args).arg(binary);
                command
            }
            None => Command::new(binary),
        };
        let child = command
            .arg("--config")
            .arg(&config)
            .args(["serve", "--listen", &listen.to_string(), "--data-dir"])
            .arg(dir.join("data"))
            .arg("--tls-dir")
            .arg(dir.join("tls"))
            .env("RUST_LOG", rust_log)
            .stdin(Stdio::null())
            .stdout(output.try_clone()?)
            .stderr(output)
            .spawn()
            .with_context(|| {
                format!(
                    "failed to start `{}`",
                    wrapper
                        .first()
                        .map_or_else(|| binary.display().to_string(), Clone::clone)
                )
            })?;
        let mut server = Self { child, log, listen };
        server.wait_listening()?;
        Ok(server)
    }

    fn wait_listening(&mut self) -> Result<()> {
        let deadline = Instant::now() + Duration::from_mins(1);
        while TcpStream::connect(self.listen).is_err() {
            if let Some(status) = self.child.try_wait()? {
                bail!("gatekeep-server exited with {status}; log:\n{}", self.log());
            }
            ensure!(
                Instant::now() < deadline,
                "gatekeep-server does not listen on {} after 60 s; log:\n{}",
                self.listen,
                self.log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(())
    }

    #[must_use]
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// What the service logged.
    #[must_use]
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log)
            .unwrap_or_default()
            .trim()
            .to_owned()
    }

    /// Stops the service with SIGTERM, as an init system would, and waits for it to
    /// commit and exit.
    pub fn stop(mut self) -> Result<()> {
        let pid = libc::pid_t::try_from(self.child.id())?;
        // SAFETY: a signal to our own child, which has not been reaped yet.
        ensure!(
            unsafe { libc::kill(pid, libc::SIGTERM) } == 0,
            "cannot signal gatekeep-server: {}",
            std::io::Error::last_os_error()
        );
        let status = self.child.wait()?;
        ensure!(
            status.success(),
            "gatekeep-server exited with {status}; log:\n{}",
            self.log()
        );
        Ok(())
    }
}

impl Drop for ServerProcess {
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            drop(self.child.kill());
            drop(self.child.wait());
        }
    }
}
