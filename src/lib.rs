//! Tollgate: an LLM API gateway on Cloudflare Pingora.
//!
//! The modules follow a request: `auth` (who is calling), `body` (model and stream from
//! the body), `route` (alias to tiers of targets), `select` (a server by the upstream's
//! balancing method), `failover` (the attempt loop), `forward` (one attempt), `inspect`
//! (judging it), `stream` (relaying the response), `observe` (the access log). `proxy`
//! is the Pingora hook dispatcher; `config`, `admin`, `app` and `cli` run the process;
//! `mock` is the demo's and the tests' upstream.

pub mod admin;
pub mod app;
pub mod auth;
pub mod body;
pub mod cli;
pub mod client_conn;
pub mod config;
pub mod error;
pub mod failover;
pub mod forward;
pub mod h1;
pub mod headers;
pub mod health;
pub mod inspect;
pub mod limits;
pub mod metrics;
pub mod mock;
pub mod nginx;
pub mod observe;
pub mod pool;
pub mod proxy;
pub mod reload;
pub mod respond;
pub mod route;
pub mod secret;
pub mod select;
pub mod stream;
pub mod upgrade;
pub mod usage;
