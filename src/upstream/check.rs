//! Active health checks, run by pingora-load-balancing as a background service: `GET
//! {url}{path}` on each server of an upstream with its credential. The verdict goes into
//! the server's passive `Health` (`health.rs`), which is all that selection reads; nothing
//! here runs on the request path.

use crate::upstream::Server;
use async_trait::async_trait;
use pingora_core::connectors::http::Connector;
use pingora_core::{Error, ErrorType};
use pingora_http::RequestHeader;
use pingora_load_balancing::health_check::HealthCheck;
use pingora_load_balancing::Backend;
use std::sync::Arc;
use std::time::Duration;

/// Active HTTP health check of an upstream's servers, run by pingora-load-balancing.
/// `GET {url}{path}` with the server's credential; a 2xx is healthy. Results land in each
/// server's [`Health`], which is what selection reads.
pub struct ActiveCheck {
    pub servers: Vec<Arc<Server>>,
    pub path: String,
    pub timeout: Duration,
    pub consecutive_success: usize,
    pub consecutive_failure: usize,
    pub provider: crate::provider::Provider,
    connector: Connector,
}

impl ActiveCheck {
    pub fn new(
        servers: Vec<Arc<Server>>,
        section: &super::HealthCheck,
        provider: crate::provider::Provider,
        ca_file: Option<String>,
    ) -> Self {
        let mut options = pingora_core::connectors::ConnectorOptions::new(8);
        options.ca_file = ca_file;
        ActiveCheck {
            servers,
            path: section.path.clone(),
            timeout: section.timeout,
            consecutive_success: section.consecutive_success.max(1),
            consecutive_failure: section.consecutive_failure.max(1),
            provider,
            connector: Connector::new(Some(options)),
        }
    }

    fn server(&self, target: &Backend) -> Option<&Arc<Server>> {
        self.servers.get(crate::upstream::index_of(target))
    }
}

#[async_trait]
impl HealthCheck for ActiveCheck {
    fn health_threshold(&self, success: bool) -> usize {
        if success {
            self.consecutive_success
        } else {
            self.consecutive_failure
        }
    }

    async fn check(&self, target: &Backend) -> pingora_core::Result<()> {
        let Some(server) = self.server(target) else {
            return Error::e_explain(ErrorType::InternalError, "unknown backend");
        };
        let Some(mut peer) = server.endpoint.peer(self.timeout, self.timeout) else {
            return Error::e_explain(ErrorType::ConnectNoRoute, "address not resolved");
        };
        peer.options.read_timeout = Some(self.timeout);
        peer.options.write_timeout = Some(self.timeout);
        let path = format!("{}{}", server.endpoint.base_path, self.path);
        let mut req = RequestHeader::build("GET", path.as_bytes(), Some(3))?;
        req.insert_header(http::header::HOST, server.endpoint.authority())?;
        crate::provider::set_credential(&mut req, server.api_key.as_ref(), self.provider)?;
        let (mut session, _) = self.connector.get_http_session(&peer).await?;
        session.set_write_timeout(Some(self.timeout));
        session.set_read_timeout(Some(self.timeout));
        session.write_request_header(Box::new(req)).await?;
        session.finish_request_body().await?;
        session.read_response_header().await?;
        let status = session.response_header().map_or(0, |h| h.status.as_u16());
        while session.read_response_body().await?.is_some() {}
        self.connector
            .release_http_session(session, &peer, Some(self.timeout))
            .await;
        if (200..300).contains(&status) {
            Ok(())
        } else {
            Error::e_explain(
                ErrorType::CustomCode("health check status", status),
                "non-2xx health check",
            )
        }
    }

    async fn health_status_change(&self, target: &Backend, healthy: bool) {
        if let Some(server) = self.server(target) {
            if healthy {
                log::info!("server {} passes its health check again", server.name);
            } else {
                log::warn!(
                    "server {} fails its health check: no traffic until it passes",
                    server.name
                );
            }
            server.state.health.set_active_ok(healthy);
        }
    }
}
