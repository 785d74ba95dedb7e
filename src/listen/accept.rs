//! The accept loop for plain-TCP client listeners. Pingora's listening service runs each
//! connection in a task whose future has room for a TLS handshake (about 9 KiB, held for
//! the connection's whole life, TLS or not). Here a plain connection's task is the
//! connection's own future and nothing else, and its socket is handed to Pingora as a
//! [`PlainTcp`] rather than Pingora's stream. TLS listeners stay on Pingora's service.
//!
//! Listening sockets live in Pingora's table of listening sockets, as Pingora's own do: a
//! socket handed over by a graceful upgrade is taken from it, and one bound here is put in
//! it for the next upgrade to hand over.

use super::{ClientListener, H2Proxy, Serve};
use crate::transport::tcp::PlainTcp;
use async_trait::async_trait;
use pingora_core::apps::HttpServerApp;
use pingora_core::server::{ListenFds, ShutdownWatch};
use pingora_core::services::Service;
use std::net::{SocketAddr, ToSocketAddrs};
use std::os::fd::{AsRawFd, FromRawFd, RawFd};
use std::sync::Arc;
use std::time::Duration;
use tokio::net::{TcpListener, TcpSocket};

/// The backlog of a listening socket (Pingora's).
const BACKLOG: u32 = 65535;
/// How long a bind waits for an address still held by another process (a restart whose
/// old process is still stopping), in one-second steps.
const BIND_TRIES: usize = 30;

/// Plain-TCP client listeners, served by one [`ClientListener`].
pub struct PlainListeners<P, S> {
    name: String,
    addrs: Vec<String>,
    app: Arc<ClientListener<P, S>>,
    threads: usize,
}

impl<P, S> PlainListeners<P, S> {
    /// Listeners on `addrs`, run on `threads` threads.
    pub fn new(name: &str, addrs: Vec<String>, app: ClientListener<P, S>, threads: usize) -> Self {
        PlainListeners {
            name: name.to_string(),
            addrs,
            app: Arc::new(app),
            threads,
        }
    }
}

#[async_trait]
impl<P, S> Service for PlainListeners<P, S>
where
    P: H2Proxy,
    S: Serve,
{
    async fn start_service(
        &mut self,
        fds: Option<ListenFds>,
        shutdown: ShutdownWatch,
        listeners_per_fd: usize,
    ) {
        let mut loops = Vec::new();
        for addr in &self.addrs {
            let listener = match listen(addr, fds.as_ref()).await {
                Ok(listener) => Arc::new(listener),
                Err(e) => {
                    // A gateway that cannot listen where it was told to must not seem to
                    // run.
                    log::error!("cannot listen on {addr}: {e}");
                    crate::observe::flush_logs();
                    std::process::exit(1);
                }
            };
            for _ in 0..listeners_per_fd.max(1) {
                loops.push(tokio::spawn(accept_loop(
                    Arc::clone(&listener),
                    Arc::clone(&self.app),
                    shutdown.clone(),
                )));
            }
        }
        for accepting in loops {
            let _ = accepting.await;
        }
        self.app.proxy.http_cleanup().await;
    }

    fn name(&self) -> &str {
        &self.name
    }

    fn threads(&self) -> Option<usize> {
        Some(self.threads)
    }

    fn listen_addresses(&self) -> Option<Vec<String>> {
        Some(self.addrs.clone())
    }
}

/// Accepts connections until shutdown starts; each runs in a task of its own.
async fn accept_loop<P, S>(
    listener: Arc<TcpListener>,
    app: Arc<ClientListener<P, S>>,
    mut shutdown: ShutdownWatch,
) where
    P: H2Proxy,
    S: Serve,
{
    loop {
        let accepted = tokio::select! {
            _ = shutdown.wait_for(|shutting_down| *shutting_down) => return,
            accepted = listener.accept() => accepted,
        };
        match accepted {
            Ok((stream, peer)) => {
                let (app, shutdown) = (Arc::clone(&app), shutdown.clone());
                let stream = Box::new(PlainTcp::new(stream, peer));
                tokio::spawn(async move { app.connection(stream, &shutdown).await });
            }
            Err(e) => {
                log::error!("accepting a client connection: {e}");
                // Out of file descriptors: give open connections a moment to close
                // rather than spin on the error.
                if e.raw_os_error() == Some(24) {
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
            }
        }
    }
}

/// The listening socket for `addr`: the one in the table (handed over by an upgrade, or
/// bound ahead of the server) or a new one, then put in the table.
async fn listen(addr: &str, fds: Option<&ListenFds>) -> std::io::Result<TcpListener> {
    let handed_over = fds.and_then(|table| table.lock().get(addr).copied());
    if let Some(fd) = handed_over {
        return from_fd(fd);
    }
    let listener = bind(addr).await?;
    if let Some(table) = fds {
        table.lock().add(addr.to_string(), listener.as_raw_fd());
    }
    Ok(listener)
}

/// A listening socket from the table. Listening again only sets the backlog.
#[allow(unsafe_code)]
fn from_fd(fd: RawFd) -> std::io::Result<TcpListener> {
    // SAFETY: the table holds listening sockets only, and each is taken by one listener.
    let socket = TcpSocket::from_std_stream(unsafe { std::net::TcpStream::from_raw_fd(fd) });
    socket.listen(BACKLOG)
}

async fn bind(addr: &str) -> std::io::Result<TcpListener> {
    let at: SocketAddr = addr.to_socket_addrs()?.next().ok_or_else(|| {
        std::io::Error::new(std::io::ErrorKind::InvalidInput, "no address to bind")
    })?;
    let mut tries = 0;
    loop {
        let socket = match at {
            SocketAddr::V4(_) => TcpSocket::new_v4()?,
            SocketAddr::V6(_) => TcpSocket::new_v6()?,
        };
        socket.set_reuseaddr(true)?;
        match socket.bind(at) {
            Ok(()) => return socket.listen(BACKLOG),
            Err(e) if e.kind() == std::io::ErrorKind::AddrInUse && tries + 1 < BIND_TRIES => {
                tries += 1;
                log::warn!("{addr} is in use; trying again in a second");
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
            Err(e) => return Err(e),
        }
    }
}
