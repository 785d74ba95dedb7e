//! The cache stage of the pipeline: the lookup before any upstream work, the answer from
//! a stored entry, and the store after a complete 200.

use super::{Gateway, Outcome, RequestCtx};
use crate::cache::{self, Directives, Entry, Key};
use crate::config::Config;
use crate::keys::auth::Caller;
use crate::relay::{self, Relayed};
use crate::route::Alias;
use crate::spec::CacheScope;
use bytes::Bytes;
use http::{HeaderName, HeaderValue};
use pingora_http::ResponseHeader;
use pingora_proxy::Session;
use std::time::Duration;

/// The largest answer a sampled trace keeps to read its id, model and finish reasons
/// (and, with `tracing.capture_content`, its text) from; past it they are left out.
const TRACE_ANSWER_LIMIT: usize = 1 << 20;

pub(super) const X_TOLLGATE_CACHE: HeaderName = HeaderName::from_static("x-tollgate-cache");

/// The largest answer kept: a sixteenth of `cache.max_size`, at most 16 MiB.
fn entry_limit(config: &Config) -> usize {
    (config.cache.max_size / 16).min(16 << 20) as usize
}

/// What the cache stage decided for a request of a cached alias.
pub(super) struct Plan {
    pub key: Key,
    pub ttl: Duration,
    /// Store the answer (not `no-store`).
    pub store: bool,
}

/// The scope part of a key: answers never cross it.
fn scope(config: &Config, caller: &Caller) -> String {
    match (config.cache.scope, caller) {
        (CacheScope::Global, _) => String::new(),
        (CacheScope::Team, c) if c.team().is_some() => {
            format!("team:{}", c.team().map_or("", |t| t.rec.id.as_str()))
        }
        (_, Caller::Anonymous) => "anonymous".into(),
        (_, c) => format!("key:{}", c.id()),
    }
}

impl Gateway {
    /// Looks the request up when its alias caches. `Ok(Some(entry))`: answer from the
    /// cache; `Ok(None)`: go upstream (with a plan to store the answer, if any).
    pub(super) async fn cache_lookup(
        &self,
        session: &Session,
        ctx: &mut RequestCtx,
        config: &Config,
        caller: &Caller,
        alias: &Alias,
        body: &Bytes,
    ) -> (Option<Entry>, Option<Plan>) {
        let Some(alias_ttl) = alias.cache_ttl else {
            return (None, None);
        };
        let d = Directives::read(&session.req_header().headers);
        if d.no_store {
            ctx.record.cache = Some(cache::Outcome::Bypass);
            return (None, None);
        }
        let path = session.req_header().uri.path();
        let Some(key) = Key::new(&scope(config, caller), path, &alias.name, body) else {
            ctx.record.cache = Some(cache::Outcome::Bypass);
            return (None, None);
        };
        let plan = Plan {
            key,
            ttl: d.ttl(alias_ttl),
            store: true,
        };
        if d.no_lookup {
            ctx.record.cache = Some(cache::Outcome::Bypass);
            return (None, Some(plan));
        }
        let now = self.keys.now();
        let found = self
            .cache
            .get(&key, &alias.name)
            .await
            .filter(|e| e.fresh(now) && e.alias == alias.name);
        ctx.record.cache = Some(if found.is_some() {
            cache::Outcome::Hit
        } else {
            cache::Outcome::Miss
        });
        (found, Some(plan))
    }

    /// Answers from a stored entry: the JSON body, or the stream's events as SSE.
    pub(super) async fn answer_hit(
        &self,
        session: &mut Session,
        ctx: &mut RequestCtx,
        entry: Entry,
    ) -> Result<(), Outcome> {
        let mut resp = ResponseHeader::build(200, Some(6))?;
        if entry.stream {
            resp.insert_header(http::header::CONTENT_TYPE, "text/event-stream")?;
            resp.insert_header(http::header::CACHE_CONTROL, "no-cache")?;
            if !session.is_http2() {
                resp.insert_header(http::header::TRANSFER_ENCODING, "chunked")?;
            }
        } else {
            resp.insert_header(http::header::CONTENT_TYPE, "application/json")?;
            resp.insert_header(http::header::CONTENT_LENGTH, entry.body.len())?;
            // A hit is not charged.
            resp.insert_header(relay::COST_HEADER, relay::cost_value(0))?;
        }
        resp.insert_header("x-request-id", ctx.record.request_id.as_str())?;
        resp.insert_header(X_TOLLGATE_CACHE, "hit")?;
        for (name, value) in ctx.answer_headers() {
            resp.insert_header(name, value)?;
        }
        ctx.record.status = 200;
        ctx.record.saved = Some((
            entry.input_tokens.saturating_add(entry.output_tokens),
            entry.cost_micro,
        ));
        session.write_response_header(Box::new(resp), false).await?;
        ctx.record.first_byte = Some(std::time::Instant::now());
        ctx.record.bytes_out = entry.body.len();
        let chunks = if entry.stream {
            entry.events()
        } else {
            vec![entry.body.clone()]
        };
        for chunk in chunks {
            session.write_response_body(Some(chunk), false).await?;
        }
        session.write_response_body(None, true).await?;
        Ok(())
    }

    /// Stores a complete 200 answer: whole JSON, or a stream that ended with its final
    /// event (`cache::is_complete`).
    pub(super) async fn cache_store(
        &self,
        ctx: &RequestCtx,
        alias: &Alias,
        stream: bool,
        relayed: &Relayed,
        plan: Plan,
    ) {
        let complete = relayed.status == 200
            && relayed.end == Some(crate::relay::StreamEnd::Complete)
            && plan.store;
        let Some(body) = relayed.capture.as_ref().and_then(|c| c.body()) else {
            return;
        };
        // `Complete` only says the upstream ended the body: one that ends it by closing
        // the connection may have been cut, so the answer itself must be whole.
        if !complete || !cache::is_complete(stream, &body) {
            return;
        }
        let usage = ctx.record.usage.unwrap_or_default();
        let entry = Entry {
            alias: alias.name.clone(),
            stream,
            body,
            input_tokens: usage.input,
            output_tokens: usage.output,
            cost_micro: ctx.record.cost_micro.unwrap_or(0),
            expires_at: self.keys.now().saturating_add(plan.ttl.as_millis() as i64),
        };
        self.cache.put(plan.key, entry, plan.ttl).await;
    }

    /// The `x-tollgate-cache` header for an answer from upstream.
    pub(super) fn cache_header(ctx: &RequestCtx) -> Option<(HeaderName, HeaderValue)> {
        ctx.record
            .cache
            .map(|c| (X_TOLLGATE_CACHE, HeaderValue::from_static(c.as_str())))
    }

    /// The capture a plan needs, or a sampled trace (its answer's id, model and finish
    /// reasons are read from it).
    pub(super) fn capture_for(
        config: &Config,
        plan: Option<&Plan>,
        traced: bool,
    ) -> Option<crate::relay::Capture> {
        plan.filter(|p| p.store)
            .map(|_| crate::relay::Capture::new(entry_limit(config)))
            .or_else(|| traced.then(|| crate::relay::Capture::new(TRACE_ANSWER_LIMIT)))
    }
}
