//! Tollgate: an LLM API gateway on Cloudflare Pingora.
//!
//! The folders follow a request: `listen` (connection caps and the header deadline),
//! `proxy` (the Pingora hooks: per-request context, endpoint dispatch, body intake, the
//! LLM pipeline), `keys` (who is calling: `keys::auth`; stored keys, teams, budget
//! reservations), `limits` (two admission stages over a counter backend), `body` (model,
//! stream and completion budget from the body), `route` (alias to tiers of targets),
//! `upstream` (servers, their health, balancers), `attempt` (the attempt loop, one attempt
//! over `transport` in `attempt::forward`, judging it with `provider::inspect`), `relay`
//! (relaying the response, usage and pricing), `observe` (the access log, metrics, trace
//! spans and usage rows). `trace` holds the trace context and the OTLP exporter. `provider` holds what differs per provider; `config`, `admin`, `store`
//! (with `store::cluster`, the Redis instances share), `app`, `ops` (reload, upgrade,
//! listeners) and `cli` run the process; `import` holds the nginx importer; `demo` the
//! embedded mock upstream (the demo's, tests' and benchmarks').

pub(crate) mod admin;
pub(crate) mod app;
pub mod attempt;
pub mod body;
pub(crate) mod cache;
pub mod cli;
pub mod clock;
pub mod config;
pub mod demo;
pub(crate) mod error;
pub(crate) mod import;
pub(crate) mod keys;
pub mod limits;
pub(crate) mod listen;
pub(crate) mod metrics;
pub(crate) mod observe;
pub(crate) mod ops;
pub mod provider;
pub(crate) mod proxy;
pub mod record;
pub mod relay;
pub mod route;
pub(crate) mod secret;
pub mod spec;
pub(crate) mod store;
pub mod trace;
pub(crate) mod transport;
pub mod upstream;
