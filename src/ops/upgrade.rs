//! Binary upgrade without a dropped connection, the way nginx does it with SIGUSR2: the
//! running process checks the config with the binary now on disk, starts that binary with
//! `-u` (it waits for the listening sockets), then sends itself SIGQUIT, on which Pingora
//! hands the sockets over `upgrade_sock` and lets in-flight requests and streams finish
//! for `server.grace_period`. Under systemd the new process is started from inside the
//! service, and `PIDFile` tells systemd the new main process. Starting a new process with
//! `-u` by hand and sending SIGQUIT to the old one does the same.

use async_trait::async_trait;
use pingora_core::server::ShutdownWatch;
use pingora_core::services::background::BackgroundService;
use std::path::PathBuf;
use std::process::Command;

/// Upgrades on SIGUSR2.
pub struct Upgrader {
    /// The binary's path as started (a replaced binary is found at the same path).
    pub exe: PathBuf,
    pub config_path: String,
    pub daemon: bool,
}

impl Upgrader {
    fn upgrade(&self) -> Result<(), String> {
        let check = Command::new(&self.exe)
            .args(["-t", "-c", &self.config_path])
            .output()
            .map_err(|e| format!("cannot run {}: {e}", self.exe.display()))?;
        if !check.status.success() {
            return Err(format!(
                "the new binary refuses the config:\n{}",
                String::from_utf8_lossy(&check.stderr)
            ));
        }
        let mut cmd = Command::new(&self.exe);
        cmd.args(["-u", "-c", &self.config_path]);
        if self.daemon {
            cmd.arg("-d");
        }
        cmd.spawn()
            .map_err(|e| format!("cannot start {}: {e}", self.exe.display()))?;
        // The new process waits on upgrade_sock; Pingora's sender retries until it listens.
        nix::sys::signal::raise(nix::sys::signal::Signal::SIGQUIT)
            .map_err(|e| format!("cannot signal self: {e}"))?;
        Ok(())
    }
}

#[async_trait]
impl BackgroundService for Upgrader {
    async fn start(&self, mut shutdown: ShutdownWatch) {
        let Ok(mut usr2) =
            tokio::signal::unix::signal(tokio::signal::unix::SignalKind::user_defined2())
        else {
            log::error!(
                "cannot listen for SIGUSR2: upgrade by starting `tollgate -u` and sending SIGQUIT"
            );
            return;
        };
        tokio::select! {
            _ = shutdown.changed() => {}
            got = usr2.recv() => {
                if got.is_some() {
                    log::info!("SIGUSR2: upgrading to {}", self.exe.display());
                    if let Err(e) = self.upgrade() {
                        log::error!("upgrade failed, this process keeps serving: {e}");
                    }
                }
            }
        }
    }
}
