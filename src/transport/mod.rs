//! Upstream transport: the gateway's own HTTP/1.1 exchange (`h1`), its pool of idle
//! connections (`pool`), and header hygiene shared by both directions (`headers`).
//! Nothing here knows about models, keys or providers.

pub mod h1;
pub mod headers;
pub mod pool;
pub mod sent;
