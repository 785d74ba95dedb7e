//! Budget alerts: a JSON POST to `alerts.webhook.url` when a budget crosses one of its
//! `alert_at` fractions (once per period) and when a request is refused for budget.
//! Delivered by a background task with a timeout per attempt and three attempts with
//! backoff, so a slow receiver never delays a request; the queue is bounded and every
//! outcome is counted in `tollgate_budget_alerts_total{result}`. With `cluster.redis`,
//! each alert is claimed first (`SET NX` on a key naming the budget, the event and the
//! period), so when several instances cross a threshold together one of them sends it.

use super::budget::{Alert, Exceeded};
use crate::secret::Secret;
use crate::store::cluster::SharedRedis;
use async_trait::async_trait;
use pingora_core::server::ShutdownWatch;
use pingora_core::services::background::BackgroundService;
use std::time::Duration;
use tokio::sync::mpsc;

/// Alerts waiting for delivery, at most.
const QUEUE: usize = 1024;
const ATTEMPTS: u32 = 3;

/// Where alerts go (`alerts.webhook`).
#[derive(Clone)]
pub struct Webhook {
    pub url: crate::secret::Secret,
    /// Extra request headers; values are secrets.
    pub headers: Vec<(String, crate::secret::Secret)>,
    /// Per delivery attempt.
    pub timeout: std::time::Duration,
}

pub struct Alerts {
    tx: mpsc::Sender<Queued>,
}

/// An alert and the name it is claimed by among instances.
struct Queued {
    claim: String,
    event: serde_json::Value,
}

/// How long a claim is kept: longer than the longest budget period (a month), so an
/// alert of a period is sent once in it.
const CLAIM_TTL_MS: u64 = 35 * 24 * 3600 * 1000;

/// The task that delivers what `Alerts` queues.
pub struct Delivery {
    rx: tokio::sync::Mutex<mpsc::Receiver<Queued>>,
    webhook: Webhook,
    /// `cluster.redis`, where instances claim each alert.
    claims: Option<SharedRedis>,
    /// The HTTP client (`http://` or `https://`); `None` if it could not be built.
    client: Option<reqwest::Client>,
}

/// `redis`: the shared Redis, when instances share one (`cluster.redis`).
pub fn channel(webhook: Webhook, redis: Option<&str>) -> Result<(Alerts, Delivery), String> {
    let (tx, rx) = mpsc::channel(QUEUE);
    Ok((
        Alerts { tx },
        Delivery {
            rx: tokio::sync::Mutex::new(rx),
            webhook,
            claims: redis.map(SharedRedis::open).transpose()?,
            client: reqwest::Client::builder()
                .redirect(reqwest::redirect::Policy::none())
                .build()
                .map_err(|e| log::error!("alerts: cannot build the HTTP client: {e}"))
                .ok(),
        },
    ))
}

impl Delivery {
    /// Whether this instance is the one to send the alert named `claim`. Without a shared
    /// Redis, or when it cannot be reached, every instance sends (twice rather than
    /// never).
    async fn claimed(&self, claim: &str) -> bool {
        let Some(redis) = &self.claims else {
            return true;
        };
        let attempt = async {
            let mut conn = redis.conn().await?;
            redis::cmd("SET")
                .arg(claim)
                .arg(1)
                .arg("NX")
                .arg("PX")
                .arg(CLAIM_TTL_MS)
                .query_async::<Option<String>>(&mut conn)
                .await
                .map_err(|e| e.to_string())
        };
        match tokio::time::timeout(Duration::from_secs(2), attempt).await {
            Ok(Ok(set)) => set.is_some(),
            Ok(Err(e)) => {
                log::warn!("alerts: cannot claim an alert in Redis ({e}); sending it");
                true
            }
            Err(_) => {
                log::warn!("alerts: Redis did not answer a claim in time; sending the alert");
                true
            }
        }
    }
}

fn count(result: &str) {
    if let Some(m) = crate::metrics::get() {
        m.alerts.with_label_values(&[result]).inc();
    }
}

impl Alerts {
    fn queue(&self, claim: String, event: serde_json::Value) {
        if self.tx.try_send(Queued { claim, event }).is_err() {
            count("failed");
            log::warn!("alerts: the delivery queue is full; an alert was dropped");
        }
    }

    /// A budget crossed a fraction of its cap.
    pub fn send(&self, a: Alert) {
        let claim = format!(
            "tollgate:alert:threshold:{}:{}:{}:{}",
            a.owner.scope, a.owner.id, a.period_start, a.fraction
        );
        self.queue(
            claim,
            serde_json::json!({
                "event": "budget_threshold",
                "scope": a.owner.scope,
                "id": a.owner.id,
                "name": a.owner.name,
                "fraction": a.fraction,
                "spend_usd": crate::relay::pricing::usd(a.spent_micro),
                "max_usd": crate::relay::pricing::usd(a.max_micro),
                "period": a.period.as_str(),
                "period_start": crate::clock::rfc3339(a.period_start),
            }),
        );
    }

    /// A request was refused for budget.
    pub fn refused(&self, e: &Exceeded) {
        let claim = format!(
            "tollgate:alert:exceeded:{}:{}:{}",
            e.owner.scope,
            e.owner.id,
            e.resets_at.unwrap_or_default()
        );
        self.queue(
            claim,
            serde_json::json!({
                "event": "budget_exceeded",
                "scope": e.owner.scope,
                "id": e.owner.id,
                "name": e.owner.name,
                "spend_usd": crate::relay::pricing::usd(e.spent_micro),
                "max_usd": crate::relay::pricing::usd(e.max_micro),
                "period": e.period.as_str(),
                "resets_at": e.resets_at.map(crate::clock::rfc3339),
            }),
        );
    }
}

#[async_trait]
impl BackgroundService for Delivery {
    async fn start(&self, mut shutdown: ShutdownWatch) {
        let mut rx = self.rx.lock().await;
        loop {
            let queued = tokio::select! {
                _ = shutdown.changed() => return,
                e = rx.recv() => match e { Some(e) => e, None => return },
            };
            if !self.claimed(&queued.claim).await {
                // Another instance sends this one.
                count("claimed_elsewhere");
                continue;
            }
            let body = queued.event.to_string();
            let Some(client) = self.client.as_ref() else {
                count("failed");
                continue;
            };
            let mut delivered = false;
            for attempt in 0..ATTEMPTS {
                if attempt > 0 {
                    tokio::time::sleep(Duration::from_millis(500 << attempt)).await;
                }
                match tokio::time::timeout(self.webhook.timeout, post(client, &self.webhook, &body))
                    .await
                {
                    Ok(Ok(status)) if (200..300).contains(&status) => {
                        delivered = true;
                        break;
                    }
                    Ok(Ok(status)) => log::warn!("alerts: the webhook answered {status}"),
                    Ok(Err(e)) => log::warn!("alerts: cannot reach the webhook: {e}"),
                    Err(_) => log::warn!("alerts: the webhook did not answer in time"),
                }
            }
            count(if delivered { "sent" } else { "failed" });
        }
    }
}

/// One POST of `body` as JSON; the status code.
async fn post(client: &reqwest::Client, w: &Webhook, body: &str) -> Result<u16, String> {
    let mut request = client
        .post(w.url.expose())
        .header("content-type", "application/json")
        .header("user-agent", "tollgate");
    for (name, value) in &w.headers {
        if valid_header(name, value) {
            request = request.header(name.as_str(), value.expose());
        }
    }
    match request.body(body.to_string()).send().await {
        Ok(r) => Ok(r.status().as_u16()),
        Err(e) => Err(crate::transport::client_error(&e).into()),
    }
}

fn valid_header(name: &str, value: &Secret) -> bool {
    http::HeaderName::from_bytes(name.as_bytes()).is_ok()
        && http::HeaderValue::from_str(value.expose()).is_ok()
}
