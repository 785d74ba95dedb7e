//! Upstream transport: the gateway's own HTTP/1.1 exchange (`h1`), its pool of idle
//! connections (`pool`), plain-TCP connections in both directions (`tcp`), and header
//! hygiene shared by both directions (`headers`).
//! Nothing here knows about models, keys or providers.

pub mod h1;
pub mod headers;
pub mod pool;
pub mod sent;
pub mod tcp;

/// What went wrong with a request of the gateway's own HTTP client (trace export, alert
/// webhook, CLI), without its URL, which may hold a credential.
pub fn client_error(e: &reqwest::Error) -> &'static str {
    if e.is_connect() {
        "cannot connect"
    } else if e.is_timeout() {
        "no answer in time"
    } else {
        "the request failed"
    }
}
