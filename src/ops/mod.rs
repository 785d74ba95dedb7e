//! Operations outside the request path: config reload (SIGHUP and `POST /admin/reload`)
//! and binary upgrade (SIGUSR2), each a Pingora background service.

pub mod reload;
pub mod upgrade;
