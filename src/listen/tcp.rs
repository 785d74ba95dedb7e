//! A plain-TCP client connection as Pingora's HTTP session sees it: tokio's socket and
//! the peer's address, nothing more. Pingora's own stream type also times every read and
//! write that waits (two clock reads each, about 20 ns apiece on a virtual machine) and
//! carries a buffer layer the gateway does not use; the gateway reads neither figure, so
//! its plain listeners hand Pingora this instead. TLS connections keep Pingora's stream.

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

/// An accepted client connection.
#[derive(Debug)]
pub struct ClientTcp {
    stream: TcpStream,
    digest: Arc<SocketDigest>,
}

impl ClientTcp {
    /// The connection `stream`, accepted from `peer`, with Nagle's algorithm off (as
    /// Pingora's listeners do): a stream's events go out as they are written rather than
    /// waiting for the client's acknowledgement of the one before.
    pub fn new(stream: TcpStream, peer: SocketAddr) -> Self {
        if let Err(e) = stream.set_nodelay(true) {
            log::debug!("cannot turn Nagle's algorithm off for a client connection: {e}");
        }
        let digest = SocketDigest::from_raw_fd(stream.as_raw_fd());
        // A new digest's address cell is empty, so this cannot fail.
        let _ = digest.peer_addr.set(Some(peer.into()));
        ClientTcp {
            stream,
            digest: Arc::new(digest),
        }
    }
}

impl AsyncRead for ClientTcp {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_read(cx, buf)
    }
}

impl AsyncWrite for ClientTcp {
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
impl Shutdown for ClientTcp {
    async fn shutdown(&mut self) {
        if let Err(e) = AsyncWriteExt::shutdown(&mut self.stream).await {
            log::debug!("closing a client connection: {e}");
        }
    }
}

impl UniqueID for ClientTcp {
    fn id(&self) -> UniqueIDType {
        self.stream.as_raw_fd()
    }
}

impl Ssl for ClientTcp {}

impl GetTimingDigest for ClientTcp {
    /// Not kept: nothing in the gateway reads it.
    fn get_timing_digest(&self) -> Vec<Option<TimingDigest>> {
        Vec::new()
    }
}

impl GetProxyDigest for ClientTcp {
    fn get_proxy_digest(&self) -> Option<Arc<ProxyDigest>> {
        None
    }
}

impl GetSocketDigest for ClientTcp {
    fn get_socket_digest(&self) -> Option<Arc<SocketDigest>> {
        Some(Arc::clone(&self.digest))
    }

    fn set_socket_digest(&mut self, digest: SocketDigest) {
        self.digest = Arc::new(digest);
    }
}

#[async_trait]
impl Peek for ClientTcp {}

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
        let tcp = ClientTcp::new(accepted, peer);
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
}
