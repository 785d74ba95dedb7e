//! Tollgate: an LLM API gateway on Cloudflare Pingora.
//!
//! The modules follow a request: `client_conn` (connection caps and the header
//! deadline), `proxy` (the Pingora hooks: per-request context, endpoint dispatch, body
//! intake, the LLM pipeline), `auth` (who is calling), `limits` (two admission stages over
//! a counter backend), `keys` (stored keys, teams, budget reservations), `body` (model and
//! stream from the body), `route` (alias to tiers of targets), `upstream` (servers, their
//! health, balancers), `failover` (the attempt loop), `forward` (one attempt, over
//! `transport`), `inspect` (judging it), `stream` (relaying the response), `observe` (the
//! access log, metrics and usage rows). `provider` holds what differs per provider;
//! `config`, `admin`, `store`, `app`, `ops` (reload, upgrade, listeners) and `cli` run the
//! process; `import` holds the nginx importer; `demo` the embedded mock upstream (the
//! demo's, tests' and benchmarks').

pub(crate) mod admin;
pub(crate) mod app;
pub(crate) mod auth;
pub mod body;
pub(crate) mod cache;
pub mod cli;
pub(crate) mod client_conn;
pub mod clock;
pub(crate) mod cluster;
pub mod config;
pub mod demo;
pub(crate) mod error;
pub(crate) mod failover;
pub(crate) mod forward;
pub(crate) mod import;
pub mod inspect;
pub(crate) mod keys;
pub mod limits;
pub(crate) mod observe;
pub(crate) mod ops;
pub mod pricing;
pub(crate) mod provider;
pub(crate) mod proxy;
pub(crate) mod respond;
pub mod route;
pub(crate) mod secret;
pub(crate) mod store;
pub(crate) mod stream;
pub(crate) mod transport;
pub mod upstream;
pub mod usage;
