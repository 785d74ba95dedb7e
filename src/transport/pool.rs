//! Idle upstream connections, kept for reuse per target.
//!
//! Pingora's connector pool spawns a watcher task for every connection it takes back and
//! checks the socket's peer address on every checkout; per request that was about 8k
//! instructions and a `getpeername` call. This pool is a list per target under a lock:
//! a connection is checked when it comes back and when it is taken (a closed one, or one
//! with unexpected bytes waiting, is dropped), the newest is reused first, and a sweep
//! closes those idle past their upstream's `idle_timeout` or closed by the server, so
//! nothing lingers without traffic either. New connections come from [`Dial`]: plain TCP
//! dialled with tokio, TLS, Unix-socket and proxied peers through Pingora's
//! `TransportConnector`.

use crate::clock::monotonic_ms;
use crate::transport::h1::Conn;
use pingora_core::connectors::TransportConnector;
use pingora_core::protocols::Stream;
use pingora_core::server::ShutdownWatch;
use pingora_core::services::background::BackgroundService;
use pingora_core::upstreams::peer::HttpPeer;
use std::collections::HashMap;
use std::pin::Pin;
use std::sync::Mutex;
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::io::{AsyncRead, ReadBuf};

/// How often idle connections are swept.
pub const SWEEP_EVERY: Duration = Duration::from_secs(5);

/// Opens new upstream connections: the gateway's is [`Dial`]; tests may dial scripted
/// in-memory upstreams, so that the attempt loop runs under paused time.
#[async_trait::async_trait]
pub trait Dialer: Send + Sync {
    async fn dial(&self, peer: &HttpPeer) -> pingora_core::Result<Stream>;
}

/// The gateway's dialer: a plain-TCP upstream is dialled with tokio and carried as a
/// [`PlainTcp`](super::tcp::PlainTcp), without the timing of every read and write that
/// Pingora's stream adds (about 0.6 % of the gateway's CPU under load, two clock reads a
/// read). TLS, Unix-socket and proxied peers go through Pingora's connector.
pub struct Dial(pub TransportConnector);

#[async_trait::async_trait]
impl Dialer for Dial {
    async fn dial(&self, peer: &HttpPeer) -> pingora_core::Result<Stream> {
        use pingora_core::upstreams::peer::Peer;
        match peer.address() {
            pingora_core::protocols::l4::socket::SocketAddr::Inet(addr)
                if !peer.tls() && peer.get_proxy().is_none() =>
            {
                let tcp = super::tcp::dial(*addr, peer.connection_timeout()).await?;
                Ok(Box::new(tcp))
            }
            _ => self.0.new_stream(peer).await,
        }
    }
}

/// Where upstream connections come from: the idle pool first, else a new one from the
/// dialer.
pub struct Connections {
    pub dialer: Box<dyn Dialer>,
    pub pool: Pool,
}

impl Connections {
    /// Takes back the connection of a finished exchange, if it can carry another one.
    pub fn give_back(&self, conn: Conn, target: u64, max_idle: Duration) {
        if let Some(stream) = conn.into_reusable() {
            self.pool.put(target, stream, max_idle);
        }
    }
}

/// Sweeps the idle pool every `SWEEP_EVERY`.
pub struct Sweeper(pub std::sync::Arc<Connections>);

#[async_trait::async_trait]
impl BackgroundService for Sweeper {
    async fn start(&self, mut shutdown: ShutdownWatch) {
        loop {
            tokio::select! {
                _ = shutdown.changed() => return,
                _ = tokio::time::sleep(SWEEP_EVERY) => self.0.pool.sweep(),
            }
        }
    }
}

struct Idle {
    stream: Stream,
    /// When it was put back (`clock::monotonic_ms`).
    since: u64,
    max_idle: Duration,
}

impl Idle {
    fn expired(&self, now: u64) -> bool {
        u128::from(now.saturating_sub(self.since)) >= self.max_idle.as_millis()
    }
}

#[derive(Default)]
struct Lists {
    /// Per target (Pingora's peer reuse hash), oldest first.
    by_target: HashMap<u64, Vec<Idle>, foldhash::fast::RandomState>,
    total: usize,
}

/// Idle connections of every target, at most `capacity` in all.
pub struct Pool {
    lists: Mutex<Lists>,
    capacity: usize,
}

impl Pool {
    pub fn new(capacity: usize) -> Self {
        Pool {
            lists: Mutex::new(Lists::default()),
            capacity,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Lists> {
        self.lists.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The newest live idle connection to `target`, if any.
    pub fn take(&self, target: u64) -> Option<Stream> {
        let now = monotonic_ms();
        let mut dead = Vec::new();
        let found = {
            let mut lists = self.lock();
            let Lists { by_target, total } = &mut *lists;
            let list = by_target.get_mut(&target)?;
            let mut found = None;
            while let Some(mut idle) = list.pop() {
                *total -= 1;
                if !idle.expired(now) && quiet(&mut idle.stream) {
                    found = Some(idle.stream);
                    break;
                }
                dead.push(idle);
            }
            found
        };
        // Closing happens outside the lock.
        drop(dead);
        found
    }

    /// Keeps `stream` for `target` for up to `max_idle`, if it is clean. When the pool
    /// is full the connection idle longest (of any target) is closed to make room.
    pub fn put(&self, target: u64, mut stream: Stream, max_idle: Duration) {
        if self.capacity == 0 || !quiet(&mut stream) {
            return;
        }
        let evicted = {
            let mut lists = self.lock();
            let evicted = if lists.total >= self.capacity {
                let oldest = lists
                    .by_target
                    .iter()
                    .filter_map(|(k, l)| l.first().map(|i| (i.since, *k)))
                    .min()
                    .map(|(_, k)| k);
                let evicted = oldest
                    .and_then(|k| lists.by_target.get_mut(&k))
                    .map(|l| l.remove(0));
                if evicted.is_some() {
                    lists.total -= 1;
                }
                evicted
            } else {
                None
            };
            lists.by_target.entry(target).or_default().push(Idle {
                stream,
                since: monotonic_ms(),
                max_idle,
            });
            lists.total += 1;
            evicted
        };
        drop(evicted);
    }

    /// Closes connections idle past their time or closed by their server.
    pub fn sweep(&self) {
        let now = monotonic_ms();
        let mut dead = Vec::new();
        {
            let mut lists = self.lock();
            let Lists { by_target, total } = &mut *lists;
            for list in by_target.values_mut() {
                let mut kept = Vec::with_capacity(list.len());
                for mut idle in list.drain(..) {
                    if !idle.expired(now) && quiet(&mut idle.stream) {
                        kept.push(idle);
                    } else {
                        *total -= 1;
                        dead.push(idle);
                    }
                }
                *list = kept;
            }
            by_target.retain(|_, l| !l.is_empty());
        }
        drop(dead);
    }

    /// Idle connections held, in all.
    #[cfg(test)]
    pub fn len(&self) -> usize {
        self.lock().total
    }

    #[cfg(test)]
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// True when nothing is waiting to be read on an idle connection: it is neither closed
/// by the server nor carrying bytes nobody asked for. Never waits.
fn quiet(stream: &mut Stream) -> bool {
    let mut cx = Context::from_waker(futures_util::task::noop_waker_ref());
    let mut byte = [0u8; 1];
    let mut buf = ReadBuf::new(&mut byte);
    matches!(Pin::new(stream).poll_read(&mut cx, &mut buf), Poll::Pending)
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncWriteExt;
    use tokio::net::{TcpListener, TcpStream};

    async fn pair(listener: &TcpListener) -> (Stream, TcpStream) {
        let addr = listener.local_addr().unwrap();
        let client = TcpStream::connect(addr).await.unwrap();
        let (server, _) = listener.accept().await.unwrap();
        (
            Box::new(pingora_core::protocols::l4::stream::Stream::from(client)),
            server,
        )
    }

    const LONG: Duration = Duration::from_secs(60);

    #[tokio::test]
    async fn the_newest_clean_connection_is_reused_and_closed_ones_are_dropped() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let pool = Pool::new(8);
        let (a, a_server) = pair(&listener).await;
        let (b, _b_server) = pair(&listener).await;
        let (a_id, b_id) = (a.id(), b.id());
        pool.put(1, a, LONG);
        pool.put(1, b, LONG);
        assert_eq!(pool.len(), 2);
        assert_eq!(pool.take(1).unwrap().id(), b_id);
        assert!(pool.take(2).is_none());
        // The server closes the other one while it idles: it is not handed out.
        drop(a_server);
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(
            pool.take(1).is_none(),
            "connection {a_id} was closed by its server"
        );
        assert!(pool.is_empty());
    }

    #[tokio::test]
    async fn unexpected_bytes_and_age_keep_a_connection_out() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let pool = Pool::new(8);
        let (a, mut a_server) = pair(&listener).await;
        a_server
            .write_all(b"HTTP/1.1 200 OK\r\n\r\n")
            .await
            .unwrap();
        tokio::time::sleep(Duration::from_millis(50)).await;
        pool.put(1, a, LONG);
        assert!(
            pool.is_empty(),
            "a connection with unread bytes is not kept"
        );

        let (b, _b_server) = pair(&listener).await;
        pool.put(1, b, Duration::from_millis(20));
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(pool.take(1).is_none(), "idle past its time");

        let (c, _c_server) = pair(&listener).await;
        pool.put(1, c, Duration::from_millis(20));
        tokio::time::sleep(Duration::from_millis(50)).await;
        pool.sweep();
        assert!(pool.is_empty(), "the sweep closes it without a checkout");
    }

    #[tokio::test]
    async fn a_full_pool_closes_the_connection_idle_longest() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let pool = Pool::new(2);
        let (a, _a) = pair(&listener).await;
        let (b, _b) = pair(&listener).await;
        let (c, _c) = pair(&listener).await;
        let (b_id, c_id) = (b.id(), c.id());
        pool.put(1, a, LONG);
        pool.put(2, b, LONG);
        pool.put(2, c, LONG);
        assert_eq!(pool.len(), 2);
        assert!(
            pool.take(1).is_none(),
            "target 1's connection was the oldest"
        );
        assert_eq!(pool.take(2).unwrap().id(), c_id);
        assert_eq!(pool.take(2).unwrap().id(), b_id);
        let none = Pool::new(0);
        let (d, _d) = pair(&listener).await;
        none.put(1, d, LONG);
        assert!(none.is_empty(), "a pool of size 0 keeps nothing");
    }
}
