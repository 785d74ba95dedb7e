//! A plain-TCP connection as Pingora's HTTP session and the gateway's upstream exchange
//! see it: tokio's socket and the peer's address, nothing more. Pingora's own stream type
//! also times every read and write that waits (two clock reads each, about 20 ns apiece
//! on a virtual machine) and carries a buffer layer the gateway does not use; the gateway
//! reads neither figure, so its plain listeners hand Pingora this instead, and plain-TCP
//! upstreams are dialled into it ([`dial`]). TLS connections keep Pingora's stream.

use async_trait::async_trait;
use pingora_core::protocols::raw_connect::ProxyDigest;
use pingora_core::protocols::{
    GetProxyDigest, GetSocketDigest, GetTimingDigest, Peek, Shutdown, SocketDigest, Ssl,
    TimingDigest, UniqueID, UniqueIDType,
};
use std::io;
use std::net::SocketAddr;
use std::os::fd::AsRawFd;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::TcpStream;

/// A client connection accepted, or an upstream connection dialled.
#[derive(Debug)]
pub struct PlainTcp {
    stream: TcpStream,
    digest: Arc<SocketDigest>,
}

impl PlainTcp {
    /// The connection `stream` to `peer`, with Nagle's algorithm off (as Pingora's
    /// listeners and connector do): a stream's events go out as they are written rather
    /// than waiting for the other end's acknowledgement of the one before.
    pub fn new(stream: TcpStream, peer: SocketAddr) -> Self {
        if let Err(e) = stream.set_nodelay(true) {
            log::debug!("cannot turn Nagle's algorithm off for a connection: {e}");
        }
        let digest = SocketDigest::from_raw_fd(stream.as_raw_fd());
        // A new digest's address cell is empty, so this cannot fail.
        let _ = digest.peer_addr.set(Some(peer.into()));
        PlainTcp {
            stream,
            digest: Arc::new(digest),
        }
    }
}

impl AsyncRead for PlainTcp {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_read(cx, buf)
    }
}

impl AsyncWrite for PlainTcp {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_shutdown(cx)
    }
}

#[async_trait]
impl Shutdown for PlainTcp {
    async fn shutdown(&mut self) {
        if let Err(e) = AsyncWriteExt::shutdown(&mut self.stream).await {
            log::debug!("closing a connection: {e}");
        }
    }
}

impl UniqueID for PlainTcp {
    fn id(&self) -> UniqueIDType {
        self.stream.as_raw_fd()
    }
}

impl Ssl for PlainTcp {}

impl GetTimingDigest for PlainTcp {
    /// Not kept: nothing in the gateway reads it.
    fn get_timing_digest(&self) -> Vec<Option<TimingDigest>> {
        Vec::new()
    }
}

impl GetProxyDigest for PlainTcp {
    fn get_proxy_digest(&self) -> Option<Arc<ProxyDigest>> {
        None
    }
}

impl GetSocketDigest for PlainTcp {
    fn get_socket_digest(&self) -> Option<Arc<SocketDigest>> {
        Some(Arc::clone(&self.digest))
    }

    fn set_socket_digest(&mut self, digest: SocketDigest) {
        self.digest = Arc::new(digest);
    }
}

#[async_trait]
impl Peek for PlainTcp {}

/// A new connection to `addr`, given up after `timeout`, with Pingora's error types for
/// what went wrong (as its connector reports them).
pub async fn dial(
    addr: SocketAddr,
    timeout: Option<std::time::Duration>,
) -> pingora_core::Result<PlainTcp> {
    use pingora_core::{Error, ErrorType};
    let connect = TcpStream::connect(addr);
    let connected = match timeout {
        Some(t) => crate::clock::within(t, connect).await.ok_or_else(|| {
            Error::explain(
                ErrorType::ConnectTimedout,
                format!("no connection to {addr} within {t:?}"),
            )
        })?,
        None => connect.await,
    };
    match connected {
        Ok(stream) => Ok(PlainTcp::new(stream, addr)),
        Err(e) => {
            let kind = match e.kind() {
                io::ErrorKind::ConnectionRefused => ErrorType::ConnectRefused,
                io::ErrorKind::HostUnreachable | io::ErrorKind::NetworkUnreachable => {
                    ErrorType::ConnectNoRoute
                }
                io::ErrorKind::TimedOut => ErrorType::ConnectTimedout,
                _ => ErrorType::ConnectError,
            };
            Error::e_because(kind, format!("connecting to {addr}"), e)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use pingora_core::protocols::IO;
    use tokio::io::AsyncReadExt;

    #[tokio::test]
    async fn a_client_connection_carries_bytes_both_ways_and_knows_its_peer() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let mut client = TcpStream::connect(listener.local_addr().unwrap())
            .await
            .unwrap();
        let (accepted, peer) = listener.accept().await.unwrap();
        assert!(!accepted.nodelay().unwrap());
        let tcp = PlainTcp::new(accepted, peer);
        assert!(tcp.stream.nodelay().unwrap(), "Nagle's algorithm is off");
        let mut conn: Box<dyn IO> = Box::new(tcp);
        let digest = conn.get_socket_digest().unwrap();
        assert_eq!(
            digest.peer_addr().and_then(|a| a.as_inet().copied()),
            Some(client.local_addr().unwrap())
        );
        assert_eq!(
            digest.local_addr().and_then(|a| a.as_inet().copied()),
            Some(listener.local_addr().unwrap())
        );
        client.write_all(b"ping").await.unwrap();
        let mut got = [0u8; 4];
        conn.read_exact(&mut got).await.unwrap();
        assert_eq!(&got, b"ping");
        conn.write_all(b"pong").await.unwrap();
        conn.flush().await.unwrap();
        Shutdown::shutdown(&mut *conn).await;
        let mut back = Vec::new();
        client.read_to_end(&mut back).await.unwrap();
        assert_eq!(back, b"pong");
    }

    #[tokio::test]
    async fn a_dialled_connection_has_nagle_off_and_knows_both_ends() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let tcp = dial(addr, Some(std::time::Duration::from_secs(5)))
            .await
            .unwrap();
        assert!(tcp.stream.nodelay().unwrap(), "Nagle's algorithm is off");
        let (mut accepted, _) = listener.accept().await.unwrap();
        let mut conn: Box<dyn IO> = Box::new(tcp);
        let digest = conn.get_socket_digest().unwrap();
        assert_eq!(
            digest.peer_addr().and_then(|a| a.as_inet().copied()),
            Some(addr)
        );
        assert_eq!(
            digest.local_addr().and_then(|a| a.as_inet().copied()),
            Some(accepted.peer_addr().unwrap())
        );
        conn.write_all(b"GET").await.unwrap();
        let mut got = [0u8; 3];
        accepted.read_exact(&mut got).await.unwrap();
        assert_eq!(&got, b"GET");
    }

    #[tokio::test]
    async fn a_refused_dial_is_reported_as_refused() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        drop(listener);
        let e = dial(addr, None).await.unwrap_err();
        assert_eq!(e.etype(), &pingora_core::ErrorType::ConnectRefused);
        assert!(e.to_string().contains(&addr.to_string()), "{e}");
    }
}
