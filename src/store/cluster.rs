//! The Redis that instances share (`cluster.redis`), as each user of it holds it: a client
//! and a connection made on first use. redis-rs's connection manager reconnects by itself
//! after that; nothing connects at start, so a Redis that is down when the gateway starts
//! delays nothing.

use redis::aio::ConnectionManager;
use std::time::Duration;
use tokio::sync::OnceCell;

/// The longest one Redis call may take before Redis counts as unreachable (a cache miss,
/// the limits' fallback, a cooldown kept on this instance).
pub(crate) const CALL_TIMEOUT: Duration = Duration::from_millis(250);

/// The longest wait for the first connection.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(1);

/// How a lost connection is made again: an attempt a second (with jitter), at most
/// `RETRIES` in a row before the next call starts another round. redis-rs's defaults
/// multiply the wait by 100 after each failure, so a Redis back after a restart of more
/// than a second went unused for up to a minute, every call meanwhile failing over to
/// counting in this process.
fn reconnecting() -> redis::aio::ConnectionManagerConfig {
    const RETRIES: usize = 5;
    redis::aio::ConnectionManagerConfig::new()
        .set_factor(1)
        .set_max_delay(1_000)
        .set_number_of_retries(RETRIES)
        .set_connection_timeout(CONNECT_TIMEOUT)
}

pub(crate) struct SharedRedis {
    client: redis::Client,
    conn: OnceCell<ConnectionManager>,
}

impl SharedRedis {
    /// `url`: `redis://`, `rediss://` or `redis+unix://`.
    pub(crate) fn open(url: &str) -> Result<Self, String> {
        Ok(SharedRedis {
            client: redis::Client::open(url).map_err(|e| e.to_string())?,
            conn: OnceCell::new(),
        })
    }

    /// The connection, made now if it was not yet.
    pub(crate) async fn conn(&self) -> Result<ConnectionManager, String> {
        let made = tokio::time::timeout(
            CONNECT_TIMEOUT,
            self.conn.get_or_try_init(|| {
                ConnectionManager::new_with_config(self.client.clone(), reconnecting())
            }),
        )
        .await;
        match made {
            Ok(Ok(c)) => Ok(c.clone()),
            Ok(Err(e)) => Err(e.to_string()),
            Err(_) => Err("connect timed out".into()),
        }
    }

    /// The connection if one was made (for work that must not wait to connect).
    pub(crate) fn made(&self) -> Option<ConnectionManager> {
        self.conn.get().cloned()
    }

    /// The client, for connections of their own (subscriptions).
    pub(crate) fn client(&self) -> &redis::Client {
        &self.client
    }
}
