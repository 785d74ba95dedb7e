//! Cooldowns shared between instances through Redis (`cluster.redis`): a target that one
//! instance saw out of quota, rate-limited or failing is skipped by all, for the same
//! time, and `DELETE /admin/cooldowns` on any instance clears it on every one. Each
//! cooldown is written as a key that expires with it (`tollgate:cooldown:NAME`, `SET
//! ... PX`) and published on one channel; every instance subscribes and cools its own copy
//! of the server (servers are matched by name, `upstream/server`, which the same config
//! gives every instance). An instance that starts, or subscribes again after losing its
//! connection (retried every second), first reads the keys, so it misses no cooldown
//! still running. Nothing here waits on the request path.

use super::health::Reason;
use super::Server;
use crate::store::cluster::{SharedRedis, CALL_TIMEOUT};
use futures_util::StreamExt;
use serde::{Deserialize, Serialize};
use std::sync::Arc;
use std::time::Duration;

const CHANNEL: &str = "tollgate:cooldowns";
const PREFIX: &str = "tollgate:cooldown:";

#[derive(Debug, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "snake_case")]
enum Event {
    /// `server` cools for `ms` for `reason`.
    Cool {
        server: String,
        ms: u64,
        reason: String,
    },
    /// Every cooldown ends (`server: None`), or one server's.
    Clear { server: Option<String> },
}

/// Where a cooldown applies: on this instance only ([`LocalCooldowns`]), or on every
/// instance sharing `cluster.redis` ([`SharedCooldowns`], which applies it here too).
pub trait Cooldowns: Send + Sync {
    /// `server` cools for `d` from `now` (`clock::monotonic_ms`) for `reason`.
    fn cool(&self, server: &Server, now: u64, d: Duration, reason: Reason);

    /// Ends the cooldowns of `servers` (of the one named `only`, or of all); returns the
    /// names of those it ended.
    fn clear(&self, servers: &[Arc<Server>], only: Option<&str>) -> Vec<String>;
}

/// Cooldowns kept on this instance.
pub struct LocalCooldowns;

impl Cooldowns for LocalCooldowns {
    fn cool(&self, server: &Server, now: u64, d: Duration, reason: Reason) {
        server.state.health.cool(now, d, reason);
    }

    fn clear(&self, servers: &[Arc<Server>], only: Option<&str>) -> Vec<String> {
        servers
            .iter()
            .filter(|s| only.is_none_or(|name| *s.name == *name))
            .map(|s| {
                s.state.health.clear();
                s.name.to_string()
            })
            .collect()
    }
}

impl Cooldowns for SharedCooldowns {
    fn cool(&self, server: &Server, now: u64, d: Duration, reason: Reason) {
        LocalCooldowns.cool(server, now, d, reason);
        self.publish(Event::Cool {
            server: server.name.to_string(),
            ms: d.as_millis() as u64,
            reason: reason.as_str().to_string(),
        });
    }

    fn clear(&self, servers: &[Arc<Server>], only: Option<&str>) -> Vec<String> {
        let cleared = LocalCooldowns.clear(servers, only);
        if !cleared.is_empty() {
            self.publish(Event::Clear {
                server: only.map(str::to_string),
            });
        }
        cleared
    }
}

pub struct SharedCooldowns {
    redis: Arc<SharedRedis>,
}

impl SharedCooldowns {
    pub fn new(url: &str) -> Result<Self, String> {
        Ok(SharedCooldowns {
            redis: Arc::new(SharedRedis::open(url)?),
        })
    }

    fn publish(&self, event: Event) {
        let Ok(text) = serde_json::to_string(&event) else {
            return;
        };
        let redis = Arc::clone(&self.redis);
        tokio::spawn(async move {
            let Ok(mut conn) = redis.conn().await else {
                log::warn!("cooldowns: Redis unavailable; this cooldown stays on this instance");
                return;
            };
            let mut pipe = redis::pipe();
            match &event {
                Event::Cool { server, ms, .. } => {
                    pipe.cmd("SET")
                        .arg(format!("{PREFIX}{server}"))
                        .arg(&text)
                        .arg("PX")
                        .arg((*ms).max(1))
                        .ignore();
                }
                Event::Clear {
                    server: Some(server),
                } => {
                    pipe.cmd("DEL").arg(format!("{PREFIX}{server}")).ignore();
                }
                Event::Clear { server: None } => {
                    let keys = running(&mut conn).await;
                    if !keys.is_empty() {
                        pipe.cmd("DEL").arg(keys).ignore();
                    }
                }
            }
            pipe.cmd("PUBLISH").arg(CHANNEL).arg(&text).ignore();
            if !matches!(
                tokio::time::timeout(CALL_TIMEOUT, pipe.query_async::<()>(&mut conn)).await,
                Ok(Ok(()))
            ) {
                log::warn!(
                    "cooldowns: could not publish to Redis; this cooldown stays on this instance"
                );
            }
        });
    }

    /// Applies what any instance shares to the servers `servers` lists at the time (the
    /// current config's), until `shutdown` turns true.
    pub async fn listen(
        &self,
        servers: ServersNow,
        mut shutdown: tokio::sync::watch::Receiver<bool>,
    ) {
        loop {
            match self.redis.client().get_async_pubsub().await {
                Ok(mut pubsub) => {
                    if pubsub.subscribe(CHANNEL).await.is_ok() {
                        self.catch_up(&servers).await;
                        let mut messages = pubsub.on_message();
                        loop {
                            tokio::select! {
                                _ = shutdown.changed() => return,
                                m = messages.next() => match m {
                                    Some(m) => {
                                        let text: String = m.get_payload().unwrap_or_default();
                                        if let Ok(event) = serde_json::from_str::<Event>(&text) {
                                            apply(&servers(), event);
                                        }
                                    }
                                    None => break,
                                },
                            }
                        }
                    }
                }
                Err(e) => log::warn!("cooldowns: cannot subscribe on Redis ({e}); retrying"),
            }
            tokio::select! {
                _ = shutdown.changed() => return,
                _ = tokio::time::sleep(Duration::from_secs(1)) => {}
            }
        }
    }
}

impl SharedCooldowns {
    /// Applies the cooldowns still running, each for the time it has left.
    async fn catch_up(&self, servers: &ServersNow) {
        let Ok(mut conn) = self.redis.client().get_multiplexed_async_connection().await else {
            return;
        };
        for key in running(&mut conn).await {
            let (text, left): (Option<String>, i64) = redis::pipe()
                .cmd("GET")
                .arg(&key)
                .cmd("PTTL")
                .arg(&key)
                .query_async(&mut conn)
                .await
                .unwrap_or((None, -2));
            let Some(Ok(Event::Cool { server, reason, .. })) =
                text.map(|t| serde_json::from_str::<Event>(&t))
            else {
                continue;
            };
            if left > 0 {
                let ms = left as u64;
                apply(&servers(), Event::Cool { server, ms, reason });
            }
        }
    }
}

/// The keys of the cooldowns running now (SCAN, never KEYS: the Redis may hold much else).
async fn running(conn: &mut impl redis::aio::ConnectionLike) -> Vec<String> {
    let mut keys = Vec::new();
    let mut cursor: u64 = 0;
    loop {
        let Ok((next, page)): Result<(u64, Vec<String>), _> = redis::cmd("SCAN")
            .arg(cursor)
            .arg("MATCH")
            .arg(format!("{PREFIX}*"))
            .arg("COUNT")
            .arg(1000)
            .query_async(conn)
            .await
        else {
            return keys;
        };
        keys.extend(page);
        if next == 0 {
            return keys;
        }
        cursor = next;
    }
}

/// Every server of the running config, listed when an event arrives.
pub type ServersNow = Arc<dyn Fn() -> Vec<Arc<Server>> + Send + Sync>;

fn apply(servers: &[Arc<Server>], event: Event) {
    match event {
        Event::Cool { server, ms, reason } => {
            let reason = Reason::parse(&reason).unwrap_or(Reason::Transient);
            let now = crate::clock::monotonic_ms();
            for s in servers.iter().filter(|s| *s.name == *server) {
                LocalCooldowns.cool(s, now, Duration::from_millis(ms), reason);
            }
        }
        Event::Clear { server } => {
            LocalCooldowns.clear(servers, server.as_deref());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn events_read_back_as_written() {
        for e in [
            Event::Cool {
                server: "u/h:1".into(),
                ms: 7000,
                reason: "quota".into(),
            },
            Event::Clear { server: None },
        ] {
            let text = serde_json::to_string(&e).unwrap();
            assert_eq!(serde_json::from_str::<Event>(&text).unwrap(), e);
        }
        for r in [
            Reason::Transient,
            Reason::Quota,
            Reason::Credentials,
            Reason::Unreachable,
        ] {
            assert_eq!(Reason::parse(r.as_str()), Some(r));
        }
    }
}
