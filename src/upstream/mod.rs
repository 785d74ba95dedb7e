//! Upstreams and their servers: endpoints, in-flight counts, passive health (`health`),
//! active checks (`check`), and stage 5, picking one server for an attempt with
//! pingora-load-balancing. `weighted` is its weighted round robin; `least_conn` is our own
//! `BackendSelection` (`balance`; Pingora has none) reading in-flight counters that live
//! outside the selector, because selectors are rebuilt on every `update()`. Backup servers
//! are only offered when no primary is usable. Nothing here does I/O on the request path:
//! host names are resolved by the config loader and the resolver service.

pub mod balance;
pub mod check;
pub mod health;
pub mod latency;
pub mod quota;
pub mod shared;

use balance::{Fastest, LeastConn};

use crate::clock::monotonic_ms as now_ms;
use crate::provider::inspect::Rules;
use crate::provider::Provider;
use crate::secret::Secret;
use crate::spec::Balance;
use arc_swap::ArcSwapOption;
use check::ActiveCheck;
use futures_util::FutureExt;
use health::Health;
use pingora_core::services::background::GenBackgroundService;
use pingora_core::upstreams::peer::HttpPeer;
use pingora_load_balancing::discovery::Static;
use pingora_load_balancing::selection::{BackendIter, BackendSelection, RoundRobin};
use pingora_load_balancing::{Backend, Backends, LoadBalancer};
use std::collections::BTreeSet;
use std::net::{SocketAddr, ToSocketAddrs};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// Where a server lives: parsed from its URL; the address is resolved off the request path.
pub struct Endpoint {
    pub tls: bool,
    pub host: String,
    pub port: u16,
    /// Path prefix from the URL without a trailing slash, e.g. `/v1`.
    pub base_path: String,
    /// Query string from the URL (Azure's `api-version=...`), appended to every request.
    pub query: Option<String>,
    /// `Host` header value, computed once.
    authority: String,
    addr: ArcSwapOption<SocketAddr>,
}

impl Endpoint {
    /// Parses `http(s)://host[:port][/path][?query]`.
    pub fn parse(url: &str) -> Result<Endpoint, String> {
        // Error messages show the URL without any credentials in it.
        let shown = crate::secret::mask_userinfo(url);
        let (tls, rest) = if let Some(r) = url.strip_prefix("https://") {
            (true, r)
        } else if let Some(r) = url.strip_prefix("http://") {
            (false, r)
        } else {
            return Err(format!(
                "{shown:?}: only http:// and https:// URLs are supported"
            ));
        };
        let (rest, query) = match rest.split_once('?') {
            Some((r, q)) => (r, Some(q.to_string())),
            None => (rest, None),
        };
        let (authority, path) = match rest.find('/') {
            Some(i) => (&rest[..i], &rest[i..]),
            None => (rest, ""),
        };
        if authority.contains('@') {
            return Err(format!(
                "{shown:?}: credentials in the URL are not supported; use api_key"
            ));
        }
        let default_port = if tls { 443 } else { 80 };
        let (host, port) = if let Some(v6) = authority.strip_prefix('[') {
            let (h, after) = v6
                .split_once(']')
                .ok_or_else(|| format!("{shown:?}: unterminated IPv6 address"))?;
            let port = match after.strip_prefix(':') {
                Some(p) => p.parse().map_err(|_| format!("{shown:?}: invalid port"))?,
                None => default_port,
            };
            (h.to_string(), port)
        } else {
            match authority.rsplit_once(':') {
                Some((h, p)) => (
                    h.to_string(),
                    p.parse().map_err(|_| format!("{shown:?}: invalid port"))?,
                ),
                None => (authority.to_string(), default_port),
            }
        };
        if host.is_empty() {
            return Err(format!("{shown:?}: missing host"));
        }
        let addr = host
            .parse::<std::net::IpAddr>()
            .ok()
            .map(|ip| Arc::new(SocketAddr::new(ip, port)));
        let bracketed = if host.contains(':') {
            format!("[{host}]")
        } else {
            host.clone()
        };
        let authority = if port == default_port {
            bracketed
        } else {
            format!("{bracketed}:{port}")
        };
        Ok(Endpoint {
            tls,
            host,
            port,
            base_path: path.trim_end_matches('/').to_string(),
            query,
            authority,
            addr: ArcSwapOption::new(addr),
        })
    }

    /// `host:port` as written in a `Host` header (port omitted when it is the default).
    pub fn authority(&self) -> &str {
        &self.authority
    }

    pub fn addr(&self) -> Option<SocketAddr> {
        self.addr.load().as_deref().copied()
    }

    /// Resolves the host name now (blocking); keeps the old address on failure.
    pub fn resolve_blocking(&self) -> std::io::Result<()> {
        if self.host.parse::<std::net::IpAddr>().is_ok() {
            return Ok(());
        }
        let found = (self.host.as_str(), self.port).to_socket_addrs()?.next();
        match found {
            Some(a) => {
                self.addr.store(Some(Arc::new(a)));
                Ok(())
            }
            None => Err(std::io::Error::other("no address found")),
        }
    }

    /// Resolves the host name on the runtime (for the resolver service).
    pub async fn resolve(&self) -> std::io::Result<()> {
        if self.host.parse::<std::net::IpAddr>().is_ok() {
            return Ok(());
        }
        let found = tokio::net::lookup_host((self.host.as_str(), self.port))
            .await?
            .next();
        match found {
            Some(a) => {
                self.addr.store(Some(Arc::new(a)));
                Ok(())
            }
            None => Err(std::io::Error::other("no address found")),
        }
    }

    /// A peer for one attempt: built from the resolved address (never a name, which
    /// `HttpPeer::new` would resolve blocking), with SNI set to the host.
    pub fn peer(&self, connect_timeout: Duration, pool_idle: Duration) -> Option<HttpPeer> {
        let addr = self.addr()?;
        let mut peer = HttpPeer::new(addr, self.tls, self.host.clone());
        peer.options.connection_timeout = Some(connect_timeout);
        peer.options.total_connection_timeout = Some(connect_timeout);
        peer.options.idle_timeout = Some(pool_idle);
        Some(peer)
    }
}

/// Live per-server state shared by every alias that reaches the server.
#[derive(Default)]
pub struct ServerState {
    in_flight: AtomicUsize,
    pub health: Health,
    /// Time to first byte, for `balance: latency` and the `latency` strategy.
    pub latency: latency::Latency,
    /// What the provider says is left of the target's own rate limits.
    pub quota: quota::Quota,
}

impl ServerState {
    pub fn in_flight(&self) -> usize {
        self.in_flight.load(Ordering::Relaxed)
    }
}

/// Counts one request in flight on a server until dropped (the end of the request by
/// any path, streams included), which is what `least_conn` balances on.
pub struct InFlight(Arc<ServerState>);

impl InFlight {
    pub fn new(state: &Arc<ServerState>) -> Self {
        state.in_flight.fetch_add(1, Ordering::Relaxed);
        InFlight(Arc::clone(state))
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}

/// One member of an upstream. Two servers on one host with different keys are two
/// servers (and two targets).
pub struct Server {
    /// `upstream/host:port[#n]`: logs, metrics, response headers (shared, never copied).
    pub name: Arc<str>,
    pub endpoint: Endpoint,
    pub api_key: Option<Secret>,
    pub weight: usize,
    pub backup: bool,
    pub max_fails: u32,
    pub fail_timeout: Duration,
    /// The URL as configured (identity across reloads).
    pub url: String,
    /// Most requests in flight (`None`: unlimited).
    pub max_conns: Option<usize>,
    pub state: Arc<ServerState>,
}

impl Server {
    pub fn new(
        name: String,
        endpoint: Endpoint,
        api_key: Option<Secret>,
        weight: usize,
        backup: bool,
    ) -> Self {
        Server {
            name: name.into(),
            endpoint,
            api_key,
            weight,
            backup,
            max_fails: 1,
            fail_timeout: Duration::from_secs(10),
            url: String::new(),
            max_conns: None,
            state: Arc::new(ServerState::default()),
        }
    }

    /// Whether the server can take an attempt at `now` (see [`crate::clock::monotonic_ms`]):
    /// its address is known, it is not cooling down and passes its active checks.
    pub fn usable(&self, now: u64) -> bool {
        self.endpoint.addr().is_some() && !self.state.health.unavailable(now)
    }

    /// Whether the server may be tried when no other target is left: cooldowns for
    /// transient failures and unreachability are ignored, quota and credential ones are not.
    pub fn usable_as_last_resort(&self, now: u64) -> bool {
        self.endpoint.addr().is_some() && !self.state.health.unavailable_unless_last_resort(now)
    }

    /// Whether the server is below its `max_conns`.
    pub fn has_room(&self) -> bool {
        self.max_conns.is_none_or(|m| self.state.in_flight() < m)
    }
}

/// A named group of servers with one balancing method and one provider kind.
pub struct Upstream {
    pub name: Arc<str>,
    pub provider: Provider,
    pub connect_timeout: Duration,
    pub first_byte_timeout: Duration,
    pub idle_timeout: Duration,
    pub servers: Vec<Arc<Server>>,
    /// Extra retry rules (`failover.retry_on` plus this upstream's own).
    pub rules: Rules,
    /// Whether streaming requests get `stream_options.include_usage` added.
    pub stream_usage: bool,
    /// How fast latency estimates of its servers move (`latency_decay`).
    pub latency_decay: Duration,
    pub balance: Balance,
    balancer: Balancer,
    checks_active: bool,
}

enum Balancer {
    Weighted(Arc<LoadBalancer<RoundRobin>>),
    LeastConn(Arc<LoadBalancer<LeastConn>>),
    Latency(Arc<LoadBalancer<Fastest>>),
}

/// Backend identity in pingora-load-balancing is (address, weight), so two servers on one
/// host with the same weight would collapse into one. Each backend's address therefore
/// carries the server's index in its upstream; the real address lives on the [`Server`].
fn backend_for(index: usize, weight: usize) -> Backend {
    Backend {
        addr: pingora_core::protocols::l4::socket::SocketAddr::Inet(SocketAddr::from((
            [0, 0, 0, 0],
            index as u16,
        ))),
        weight,
        ext: Default::default(),
    }
}

pub fn index_of(b: &Backend) -> usize {
    b.addr
        .as_inet()
        .map(|a| a.port() as usize)
        .unwrap_or(usize::MAX)
}

/// How an upstream is reached and balanced: what `upstreams.NAME` says besides its
/// servers and error rules, as `config` builds it.
#[derive(Debug, Clone)]
pub struct Settings {
    pub provider: Provider,
    pub balance: Balance,
    pub connect_timeout: Duration,
    pub first_byte_timeout: Duration,
    pub idle_timeout: Duration,
    /// Whether streams report usage only when asked; `None`: the provider's default.
    pub stream_usage: Option<bool>,
    pub latency_decay: Duration,
    pub health_check: Option<HealthCheck>,
}

/// Active health checks of an upstream's servers.
#[derive(Debug, Clone)]
pub struct HealthCheck {
    pub path: String,
    pub interval: Duration,
    pub timeout: Duration,
    pub consecutive_success: usize,
    pub consecutive_failure: usize,
}

impl Upstream {
    /// `ca_file`: the CAs trusted for https (`server.ca_file`), for the health checks.
    pub fn new(
        name: String,
        settings: impl Into<Settings>,
        servers: Vec<Server>,
        rules: Rules,
        ca_file: Option<String>,
    ) -> Self {
        let section = &settings.into();
        let servers: Vec<Arc<Server>> = servers.into_iter().map(Arc::new).collect();
        let set: BTreeSet<Backend> = servers
            .iter()
            .enumerate()
            .map(|(i, s)| backend_for(i, s.weight))
            .collect();
        let mut backends = Backends::new(Static::new(set));
        if let Some(hc) = &section.health_check {
            backends.set_health_check(Box::new(ActiveCheck::new(
                servers.clone(),
                hc,
                section.provider,
                ca_file,
            )));
        }
        let interval = section.health_check.as_ref().map(|hc| hc.interval);
        let balancer = match section.balance {
            Balance::Weighted => {
                let mut lb = LoadBalancer::from_backends(backends);
                lb.health_check_frequency = interval;
                settle(lb.update());
                Balancer::Weighted(Arc::new(lb))
            }
            Balance::LeastConn => {
                let load: Arc<[Arc<ServerState>]> =
                    servers.iter().map(|s| Arc::clone(&s.state)).collect();
                let mut lb = LoadBalancer::from_backends_with_config(backends, Some(load));
                lb.health_check_frequency = interval;
                settle(lb.update());
                Balancer::LeastConn(Arc::new(lb))
            }
            Balance::Latency => {
                let load: Arc<[Arc<ServerState>]> =
                    servers.iter().map(|s| Arc::clone(&s.state)).collect();
                let config = (load, section.latency_decay);
                let mut lb = LoadBalancer::from_backends_with_config(backends, Some(config));
                lb.health_check_frequency = interval;
                settle(lb.update());
                Balancer::Latency(Arc::new(lb))
            }
        };
        Upstream {
            name: name.into(),
            provider: section.provider,
            connect_timeout: section.connect_timeout,
            first_byte_timeout: section.first_byte_timeout,
            idle_timeout: section.idle_timeout,
            servers,
            rules,
            stream_usage: section
                .stream_usage
                .unwrap_or_else(|| crate::provider::asks_for_stream_usage(section.provider)),
            latency_decay: section.latency_decay,
            balance: section.balance,
            balancer,
            checks_active: section.health_check.is_some(),
        }
    }

    /// Adds the active health check of this upstream (when configured) to the server as
    /// a background service run by pingora-load-balancing.
    pub fn add_health_service(&self, server: &mut pingora_core::server::Server) {
        if !self.checks_active {
            return;
        }
        let name = format!("health {}", self.name);
        match &self.balancer {
            Balancer::Weighted(lb) => {
                server.add_service(GenBackgroundService::new(name, Arc::clone(lb)));
            }
            Balancer::LeastConn(lb) => {
                server.add_service(GenBackgroundService::new(name, Arc::clone(lb)));
            }
            Balancer::Latency(lb) => {
                server.add_service(GenBackgroundService::new(name, Arc::clone(lb)));
            }
        }
    }

    /// Picks a server for one attempt. `accept` says whether a server may be used by this
    /// request (not tried yet, not cooling down). Primaries first; backups only when no
    /// primary is accepted.
    pub fn pick(&self, accept: impl Fn(&Arc<Server>) -> bool) -> Option<&Arc<Server>> {
        self.pick_with(false, accept)
    }

    /// [`Upstream::pick`]; with `last_resort`, servers cooling down for transient failures
    /// or unreachability are accepted too (never those out of quota or with a rejected key).
    pub fn pick_with(
        &self,
        last_resort: bool,
        accept: impl Fn(&Arc<Server>) -> bool,
    ) -> Option<&Arc<Server>> {
        let now = now_ms();
        let usable = |s: &Server| {
            if last_resort {
                s.usable_as_last_resort(now)
            } else {
                s.usable(now)
            }
        };
        // Health comes from each server's own state (cooldowns and active checks), which
        // outlives the selectors; the load balancer's own flag is not consulted.
        let eligible = |b: &Backend, backup: bool| {
            self.servers
                .get(index_of(b))
                .is_some_and(|s| s.backup == backup && usable(s) && s.has_room() && accept(s))
        };
        // One server (most upstreams): picked when eligible, whatever the balancer.
        if let [only] = self.servers.as_slice() {
            return (usable(only) && only.has_room() && accept(only)).then_some(only);
        }
        // Round robin's fallback order is pseudo-random; enough steps to visit every
        // server with near certainty.
        let steps = 16 + self.servers.len() * 8;
        let chosen = match &self.balancer {
            Balancer::Weighted(lb) => primary_then_backup(lb, steps, eligible),
            Balancer::LeastConn(lb) => primary_then_backup(lb, steps, eligible),
            Balancer::Latency(lb) => primary_then_backup(lb, steps, eligible),
        }?;
        self.servers.get(index_of(&chosen))
    }
}

/// The first eligible primary in the balancer's order, else the first eligible backup.
fn primary_then_backup<S>(
    lb: &LoadBalancer<S>,
    steps: usize,
    eligible: impl Fn(&Backend, bool) -> bool,
) -> Option<Backend>
where
    S: BackendSelection + 'static,
    S::Iter: BackendIter,
{
    lb.select_with(b"", steps, |b, _healthy| eligible(b, false))
        .or_else(|| lb.select_with(b"", steps, |b, _healthy| eligible(b, true)))
}

/// Static discovery never waits, so its update completes on the first poll.
fn settle(update: impl std::future::Future<Output = pingora_core::Result<()>>) {
    match update.now_or_never() {
        Some(Ok(())) => {}
        Some(Err(e)) => log::error!("load balancer update failed: {e}"),
        None => log::error!("load balancer update did not complete"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn section(balance: Balance) -> crate::config::file::UpstreamSection {
        crate::config::file::UpstreamSection::new(Provider::Generic, balance)
    }

    /// Servers `s0`, `s1`, ... with these weights and backup flags.
    fn servers(list: &[(usize, bool)]) -> Vec<Server> {
        list.iter()
            .enumerate()
            .map(|(i, &(weight, backup))| {
                let url = format!("http://127.0.0.1:{}/v1", 9000 + i);
                Server::new(
                    format!("s{i}"),
                    Endpoint::parse(&url).unwrap(),
                    None,
                    weight,
                    backup,
                )
            })
            .collect()
    }

    fn upstream(balance: Balance, list: &[(usize, bool)]) -> Upstream {
        Upstream::new(
            "u".into(),
            &section(balance),
            servers(list),
            Rules::default(),
            None,
        )
    }

    fn count(u: &Upstream, n: usize) -> Vec<usize> {
        let mut hits = vec![0; u.servers.len()];
        for _ in 0..n {
            let s = u.pick(|_| true).unwrap();
            hits[u.servers.iter().position(|x| Arc::ptr_eq(x, s)).unwrap()] += 1;
        }
        hits
    }

    #[test]
    fn weighted_follows_weights() {
        let u = upstream(Balance::Weighted, &[(3, false), (1, false)]);
        assert_eq!(count(&u, 400), vec![300, 100]);
    }

    #[test]
    fn same_host_servers_stay_distinct() {
        let section_servers = vec![
            Server::new(
                "a".into(),
                Endpoint::parse("http://10.0.0.1/v1").unwrap(),
                Some(Secret::new("k1")),
                1,
                false,
            ),
            Server::new(
                "b".into(),
                Endpoint::parse("http://10.0.0.1/v1").unwrap(),
                Some(Secret::new("k2")),
                1,
                false,
            ),
        ];
        let u = Upstream::new(
            "u".into(),
            &section(Balance::Weighted),
            section_servers,
            Rules::default(),
            None,
        );
        assert_eq!(count(&u, 10), vec![5, 5]);
    }

    #[test]
    fn least_conn_avoids_busy_servers_relative_to_weight() {
        let u = upstream(Balance::LeastConn, &[(1, false), (1, false), (2, false)]);
        let _g1 = InFlight::new(&u.servers[0].state);
        let _g2 = InFlight::new(&u.servers[2].state);
        // s1 is idle: it is chosen every time while it stays idle.
        for _ in 0..5 {
            assert_eq!(&*u.pick(|_| true).unwrap().name, "s1");
        }
        let _g3 = InFlight::new(&u.servers[1].state);
        // s0: 1/1, s1: 1/1, s2: 1/2 -> s2.
        assert_eq!(&*u.pick(|_| true).unwrap().name, "s2");
    }

    #[test]
    fn least_conn_spreads_ties() {
        let u = upstream(Balance::LeastConn, &[(1, false), (1, false)]);
        assert_eq!(count(&u, 10), vec![5, 5]);
    }

    #[test]
    fn a_server_at_max_conns_is_skipped() {
        let mut u = upstream(Balance::Weighted, &[(1, false), (1, false)]);
        Arc::get_mut(&mut u.servers[0]).unwrap().max_conns = Some(1);
        let _busy = InFlight::new(&u.servers[0].state);
        assert_eq!(count(&u, 6), vec![0, 6]);
    }

    #[test]
    fn cooling_servers_are_skipped() {
        let u = upstream(Balance::Weighted, &[(1, false), (1, false)]);
        u.servers[0].state.health.cool(
            now_ms(),
            Duration::from_secs(60),
            crate::upstream::health::Reason::Quota,
        );
        assert_eq!(count(&u, 10), vec![0, 10]);
    }

    #[test]
    fn a_lone_server_is_picked_as_a_balancer_would_pick_it() {
        use crate::upstream::health::Reason::{Quota, Transient};
        for balance in [Balance::Weighted, Balance::LeastConn, Balance::Latency] {
            for backup in [false, true] {
                let u = upstream(balance, &[(1, backup)]);
                assert_eq!(&*u.pick(|_| true).unwrap().name, "s0");
                assert!(u.pick(|_| false).is_none());
                let health = &u.servers[0].state.health;
                health.cool(now_ms(), Duration::from_secs(60), Transient);
                assert!(u.pick(|_| true).is_none() && u.pick_with(true, |_| true).is_some());
                health.cool(now_ms(), Duration::from_secs(120), Quota);
                assert!(u.pick_with(true, |_| true).is_none(), "out of quota");
            }
        }
    }

    #[test]
    fn backups_only_when_no_primary_is_accepted() {
        let u = upstream(Balance::Weighted, &[(1, false), (1, true)]);
        assert_eq!(count(&u, 20), vec![20, 0]);
        let chosen = u.pick(|s| &*s.name != "s0").unwrap();
        assert_eq!(&*chosen.name, "s1");
        assert!(u.pick(|_| false).is_none());
    }

    /// The `latency` balancer under a paused clock: each pick is answered at once with
    /// the server's time to first byte as its sample.
    #[tokio::test(start_paused = true)]
    async fn a_slow_server_loses_its_share_and_takes_it_back_once_it_recovers() {
        let decay = Duration::from_secs(1);
        let mut s = section(Balance::Latency);
        s.latency_decay = crate::config::units::Seconds(decay);
        let two = servers(&[(1, false), (1, false)]);
        let u = Upstream::new("u".into(), &s, two, Rules::default(), None);
        // Requests `n` picks, 10 ms apart, with the slow server answering in `slow_ms`;
        // returns how many it got.
        let run = |n: usize, slow_ms: u64| {
            let u = &u;
            async move {
                let mut slow = 0;
                for _ in 0..n {
                    let s = u.pick(|_| true).unwrap();
                    let ttfb = if &*s.name == "s1" {
                        slow += 1;
                        slow_ms
                    } else {
                        1
                    };
                    let sample = Duration::from_millis(ttfb);
                    s.state.latency.observe(sample, now_ms(), decay);
                    tokio::time::advance(Duration::from_millis(10)).await;
                }
                slow
            }
        };
        let slow = run(400, 50).await;
        assert!(slow < 80, "the slow server got {slow} of 400");
        // It recovers. Idle, its estimate decays below the fast one's next sample (in
        // latency_decay x ln(50), about 4 s); the probe's fast answer is blended in, and
        // within two seconds of traffic it has a third of the requests again.
        tokio::time::advance(Duration::from_secs(5)).await;
        let probed = run(200, 1).await;
        let share = run(200, 1).await;
        assert!(probed > 0, "the recovered server was not probed");
        assert!(share >= 60, "after recovering, it got {share} of 200");
    }

    #[test]
    fn urls_parse_into_endpoints() {
        let e = Endpoint::parse("https://api.openai.com/v1/").unwrap();
        assert!(e.tls);
        assert_eq!(
            (e.host.as_str(), e.port, e.base_path.as_str()),
            ("api.openai.com", 443, "/v1")
        );
        assert_eq!(e.authority(), "api.openai.com");
        let e = Endpoint::parse("http://[::1]:8000/openai/deployments/x?api-version=1").unwrap();
        assert_eq!(e.authority(), "[::1]:8000");
        assert_eq!(e.query.as_deref(), Some("api-version=1"));
        assert!(e.addr().is_some());
        assert!(Endpoint::parse("ftp://x").is_err());
        assert!(Endpoint::parse("http://u:p@x").is_err());
    }
}
