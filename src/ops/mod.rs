//! Operations outside the request path: config reload (SIGHUP and `POST /admin/reload`)
//! and binary upgrade (SIGUSR2), each a Pingora background service; and listeners on
//! port 0, bound before the server starts.

pub mod listeners;
pub mod reload;
pub mod upgrade;
