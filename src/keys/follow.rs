//! Keeps the directory in step with changes made through other instances sharing a
//! PostgreSQL store. Every admin change is announced on the `tollgate_keys` channel
//! (`NOTIFY`, sent with the change); each instance listens and re-reads keys and teams
//! when one arrives, so a key created, changed, blocked or deleted anywhere applies
//! everywhere within about a second. Notifications sent while the listening connection
//! is down are lost, so a reconnect triggers a re-read too, and a full re-read every
//! `store.refresh_interval` is the safety net. That periodic re-read also recounts every
//! budget's spend from the usage rows of all instances (one sum query per budget).

use super::budget::BudgetSpec;
use super::Directory;
use async_trait::async_trait;
use pingora_core::server::ShutdownWatch;
use pingora_core::services::background::BackgroundService;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::mpsc;

/// What the follower reads of the running config at each turn: the periodic re-read's
/// interval (`store.refresh_interval`) and the config keys that carry a budget.
pub type Settings = Arc<dyn Fn() -> (Duration, Vec<(String, BudgetSpec)>) + Send + Sync>;

pub struct Follower {
    pub directory: Arc<Directory>,
    pub settings: Settings,
    /// The PostgreSQL URL (`store.url`).
    pub url: String,
}

#[async_trait]
impl BackgroundService for Follower {
    async fn start(&self, mut shutdown: ShutdownWatch) {
        // A one-slot channel: changes arriving during a re-read make one more re-read.
        let (tx, mut rx) = mpsc::channel(1);
        let listening = self
            .directory
            .store
            .spawn(crate::store::records::listen(self.url.clone(), tx));
        loop {
            let (every, _) = (self.settings)();
            let periodic = tokio::select! {
                _ = shutdown.changed() => break,
                _ = rx.recv() => false,
                _ = tokio::time::sleep(every) => true,
            };
            let _one_at_a_time = self.directory.writes.lock().await;
            let (_, budgets) = (self.settings)();
            let done = if periodic {
                // The full re-read also recounts budgets' spend from the usage rows.
                self.directory.recount(budgets).await
            } else {
                self.directory.refresh(budgets).await
            };
            if let Err(e) = done {
                log::error!("store: cannot re-read keys and teams: {e}");
            }
        }
        if let Some(task) = listening {
            task.abort();
        }
    }
}
