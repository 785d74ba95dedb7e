//! Listeners on port 0. Such a listener is bound here, before the server starts, so the
//! port it got is known (printed for scripts and tests) and is never let go for another
//! process to take in between. The socket is put in Pingora's table of listening sockets
//! (the one a graceful upgrade hands over) under its concrete address, where Pingora finds
//! it instead of binding again.

use async_trait::async_trait;
use pingora_core::server::{ListenFds, ShutdownWatch};
use pingora_core::services::Service;
use std::net::{SocketAddr, TcpListener};
use std::os::fd::IntoRawFd;

/// Sockets bound ahead of the server, by their concrete address.
#[derive(Default)]
pub struct Prebound {
    sockets: Vec<(String, TcpListener)>,
}

impl Prebound {
    /// Binds `addr` now when its port is 0, and returns the address to listen on.
    pub fn bind(&mut self, addr: SocketAddr) -> std::io::Result<SocketAddr> {
        if addr.port() != 0 {
            return Ok(addr);
        }
        let listener = TcpListener::bind(addr)?;
        // Pingora's accept loop is async: the socket must not block.
        listener.set_nonblocking(true)?;
        let concrete = listener.local_addr()?;
        self.sockets.push((concrete.to_string(), listener));
        Ok(concrete)
    }

    /// `service`, started with these sockets in its table of listening sockets.
    pub fn serve<S: Service>(self, service: S) -> WithPrebound<S> {
        WithPrebound {
            inner: service,
            sockets: self,
        }
    }
}

/// A listening service whose port-0 sockets were bound ahead of time.
pub struct WithPrebound<S> {
    inner: S,
    sockets: Prebound,
}

#[async_trait]
impl<S: Service> Service for WithPrebound<S> {
    async fn start_service(
        &mut self,
        fds: Option<ListenFds>,
        shutdown: ShutdownWatch,
        listeners_per_fd: usize,
    ) {
        if let Some(table) = &fds {
            let mut table = table.lock();
            for (addr, listener) in self.sockets.sockets.drain(..) {
                // A socket handed over by an upgrade wins; ours then closes on drop.
                if table.get(&addr).is_none() {
                    table.add(addr, listener.into_raw_fd());
                }
            }
        }
        self.inner
            .start_service(fds, shutdown, listeners_per_fd)
            .await
    }

    fn name(&self) -> &str {
        self.inner.name()
    }

    fn threads(&self) -> Option<usize> {
        self.inner.threads()
    }

    fn listen_addresses(&self) -> Option<Vec<String>> {
        self.inner.listen_addresses()
    }
}
