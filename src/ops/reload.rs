//! Configuration reload without a new process: SIGHUP (the systemd `ExecReload`) or
//! `POST /admin/reload`. The new file is validated as a whole and swapped in atomically
//! only when valid; a bad file never replaces a good one. Servers that still exist keep
//! their cooldowns, health and in-flight counts. Listeners and thread counts are fixed at
//! start: changing them needs a binary upgrade (`-u`), which also re-reads the file.

use crate::config::{Config, ConfigErrors};
use crate::metrics;
use arc_swap::ArcSwap;
use async_trait::async_trait;
use pingora_core::server::ShutdownWatch;
use pingora_core::services::background::BackgroundService;
use std::sync::{Arc, Mutex};

/// Runs after a successful reload, with the new config, on a blocking thread.
pub type AfterReload = Box<dyn Fn(&Config) + Send + Sync>;

/// Reloads the config file into the live config.
pub struct Reloader {
    pub config: Arc<ArcSwap<Config>>,
    pub path: String,
    /// One reload at a time.
    lock: Mutex<()>,
    after: Option<AfterReload>,
}

impl Reloader {
    pub fn new(config: Arc<ArcSwap<Config>>, path: String) -> Self {
        Reloader {
            config,
            path,
            lock: Mutex::new(()),
            after: None,
        }
    }

    /// What else a reload does (write queued usage rows, re-read budget spend).
    pub fn with_after(mut self, after: AfterReload) -> Self {
        self.after = Some(after);
        self
    }

    /// Reads, validates and swaps in the config file. On error the running config stays.
    pub fn reload(&self) -> Result<(), ConfigErrors> {
        let _one = self.lock.lock().unwrap_or_else(|p| p.into_inner());
        let old = self.config.load_full();
        let env = |name: &str| std::env::var(name).ok();
        let result = std::fs::read_to_string(&self.path)
            .map_err(|e| {
                ConfigErrors(vec![crate::config::ConfigError {
                    path: String::new(),
                    message: format!("cannot read {}: {e}", self.path),
                }])
            })
            .and_then(|text| Config::parse_after(&text, &env, Some(&old)));
        let m = metrics::get();
        match result {
            Ok(new) => {
                if new.listen != old.listen
                    || new.admin_listen != old.admin_listen
                    || new.server.threads != old.server.threads
                {
                    log::warn!("reload: listeners and threads are fixed at start; the change applies at the next upgrade or restart");
                }
                if new.tracing != old.tracing {
                    log::warn!("reload: tracing is fixed at start; the change applies at the next upgrade or restart");
                }
                if new.store.url != old.store.url {
                    log::warn!("reload: store.url is fixed at start; the change applies at the next upgrade or restart");
                }
                new.resolve();
                let new = Arc::new(new);
                self.config.store(Arc::clone(&new));
                log::info!("configuration {} reloaded", self.path);
                if let Some(m) = m {
                    m.config_reloads.with_label_values(&["ok"]).inc();
                }
                if let Some(after) = &self.after {
                    after(&new);
                }
                Ok(())
            }
            Err(errors) => {
                log::error!(
                    "reload of {} refused, the running configuration stays:",
                    self.path
                );
                for e in &errors.0 {
                    log::error!("  {e}");
                }
                if let Some(m) = m {
                    m.config_reloads.with_label_values(&["error"]).inc();
                }
                Err(errors)
            }
        }
    }
}

/// Reloads on SIGHUP.
pub struct HangupReload(pub Arc<Reloader>);

#[async_trait]
impl BackgroundService for HangupReload {
    async fn start(&self, mut shutdown: ShutdownWatch) {
        let Ok(mut hup) = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())
        else {
            log::error!("cannot listen for SIGHUP: reload only through POST /admin/reload");
            return;
        };
        loop {
            tokio::select! {
                _ = shutdown.changed() => return,
                got = hup.recv() => {
                    if got.is_none() {
                        return;
                    }
                    let reloader = Arc::clone(&self.0);
                    // Reading the file and resolving names block: keep them off the runtime's workers.
                    let _ = tokio::task::spawn_blocking(move || reloader.reload()).await;
                }
            }
        }
    }
}
