//! Assembling the Pingora server: the proxy service, the admin service and the background
//! services, from a validated config. Listeners on port 0 are bound before the server
//! starts (`ops::listeners`); their ports are printed so that scripts and tests find them.

use crate::admin::AdminApp;
use crate::cache::{CacheBackend, MemoryCache, RedisCache};
use crate::clock::{Clock, SystemClock};
use crate::config::Config;
use crate::keys::Directory;
use crate::limits::{CounterBackend, LocalCounters, RedisCounters};
use crate::listen::{
    default_max_connections, raise_open_file_limit, ClientListener, ConnectionCounts,
    PlainListeners,
};
use crate::ops::listeners::Prebound;
use crate::ops::reload::{HangupReload, Reloader};
use crate::ops::upgrade::Upgrader;
use crate::proxy::{Gateway, Shared};
use crate::secret::mask_userinfo;
use crate::store::usage::{UsageQueue, Writer};
use crate::store::Store;
use crate::transport::pool::{Connections, Dial, Pool, Sweeper};
use crate::upstream::shared::{Cooldowns, LocalCooldowns, SharedCooldowns};
use arc_swap::ArcSwap;
use async_trait::async_trait;
use pingora_core::connectors::ConnectorOptions;
use pingora_core::connectors::TransportConnector;
use pingora_core::listeners::tls::TlsSettings;
use pingora_core::listeners::{L4BufferSettings, ListenerConfig};
use pingora_core::server::configuration::{Opt, ServerConf};
use pingora_core::server::{Server, ShutdownWatch};
use pingora_core::services::background::{background_service, BackgroundService};
use pingora_core::services::listening::Service;
use std::io::Write;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

/// How the process was asked to run.
#[derive(Debug, Default, Clone)]
pub struct RunMode {
    /// Detach and run in the background (`-d`).
    pub daemon: bool,
    /// Take the listeners over from a running instance (`-u`).
    pub upgrade: bool,
    /// The config file, for reloads and upgrades (`None`: the embedded demo config).
    pub config_path: Option<String>,
}

/// Builds every service and runs until the process is told to stop, then writes the
/// usage rows still queued. Never returns.
pub fn run(config: Config, mode: RunMode) -> ! {
    match start(config, mode) {
        Ok((server, usage, store, tracer)) => {
            server.run(pingora_core::server::RunArgs::default());
            if let Some(t) = tracer {
                t.flush(std::time::Duration::from_secs(5));
            }
            match usage.flush_blocking(&store) {
                Ok(n) if n > 0 => log::info!("store: {n} usage rows written at exit"),
                Ok(_) => {}
                Err(e) => log::error!(
                    "store: {} usage rows could not be written at exit: {e}",
                    usage.depth()
                ),
            }
            crate::observe::flush_logs();
            std::process::exit(0)
        }
        Err(e) => {
            eprintln!("tollgate: {e}");
            std::process::exit(1);
        }
    }
}

/// Opens the store (creating and migrating it) and loads keys, teams and the current
/// periods' spend into a directory.
fn open_store(config: &Config) -> std::io::Result<Arc<Directory>> {
    let clock: Arc<dyn Clock> = Arc::new(SystemClock);
    let now = clock.now_ms();
    let config_budgets = config.keys.budgets();
    let loaded = crate::store::prepare(&config.store.url, now, move |pool| {
        crate::keys::load(pool, now, Default::default(), config_budgets)
    })
    .map_err(|e| {
        std::io::Error::other(format!("store {}: {e}", mask_userinfo(&config.store.url)))
    })?;
    let directory = Directory::new(Store::new(&config.store.url), clock);
    let (keys, teams) = (loaded.keys.len(), loaded.teams.len());
    directory.install(loaded);
    log::info!(
        "store {}: {keys} keys, {teams} teams",
        mask_userinfo(&config.store.url)
    );
    Ok(Arc::new(directory))
}

type Started = (
    Server,
    Arc<UsageQueue>,
    Store,
    Option<Arc<crate::trace::Tracer>>,
);

fn start(config: Config, mode: RunMode) -> std::io::Result<Started> {
    // Listeners on port 0 are bound now, so their ports are known and stay ours; an
    // upgrade takes the old process's sockets instead.
    let (mut proxy_sockets, mut tls_sockets, mut admin_sockets) = (
        Prebound::default(),
        Prebound::default(),
        Prebound::default(),
    );
    let bind = |p: &mut Prebound, a: SocketAddr| if mode.upgrade { Ok(a) } else { p.bind(a) };
    let listen: Vec<SocketAddr> = config
        .listen
        .iter()
        .map(|a| bind(&mut proxy_sockets, *a))
        .collect::<Result<_, _>>()?;
    let admin_listen = bind(&mut admin_sockets, config.admin_listen)?;
    let tls_listen: Vec<SocketAddr> = config
        .server
        .tls
        .iter()
        .map(|t| {
            let addr = t.listen.parse().map_err(std::io::Error::other)?;
            bind(&mut tls_sockets, addr)
        })
        .collect::<Result<_, _>>()?;
    config.resolve();
    crate::metrics::init();
    for w in config.warnings() {
        log::warn!("{w}");
    }
    let directory = open_store(&config)?;
    if config.keys.is_empty() && directory.snapshot().keys.is_empty() {
        log::warn!("no client keys are configured or stored: the gateway is open to anyone who can reach it");
    }
    if config.admin.master_key.is_none() {
        log::warn!("admin.master_key is not set: the keys, teams and spend API (/admin/keys, /admin/teams, /admin/spend) is off");
    }
    let usage = UsageQueue::new(config.store.queue_size);
    let flush_interval = config.store.flush_interval;
    let (alerts, delivery) = match &config.webhook {
        Some(w) => {
            let redis = config
                .cluster
                .redis
                .as_ref()
                .map(|r| r.expose().to_string());
            let (a, d) = crate::keys::alerts::channel(w.clone(), redis.as_deref())
                .map_err(|e| std::io::Error::other(format!("cluster.redis: {e}")))?;
            (Some(Arc::new(a)), Some(d))
        }
        None => (None, None),
    };

    let tracer = match &config.tracing {
        Some(t) => {
            log::info!(
                "tracing: spans to {} ({} of new traces sampled)",
                crate::secret::mask_userinfo(t.endpoint.split('?').next().unwrap_or("")),
                t.sample_ratio
            );
            Some(crate::trace::Tracer::start(t.clone())?)
        }
        None => None,
    };
    let s = &config.server;
    let conf = ServerConf {
        daemon: mode.daemon,
        pid_file: s.pid_file.clone(),
        upgrade_sock: s.upgrade_sock.clone(),
        threads: s.threads,
        grace_period_seconds: Some(s.grace_period.as_secs()),
        graceful_shutdown_timeout_seconds: Some(5),
        ca_file: s.ca_file.clone(),
        ..ServerConf::default()
    };
    let opt = Opt {
        upgrade: mode.upgrade,
        daemon: mode.daemon,
        nocapture: false,
        test: false,
        conf: None,
    };
    let mut server = Server::new_with_opt_and_conf(opt, conf);
    server.bootstrap();

    let threads = s.threads;
    let tls = s.tls.clone();
    let pool_size = s.upstream_pool_size;
    let summary = summary(&config, &listen, admin_listen);
    let config = Arc::new(ArcSwap::from_pointee(config));
    let connections = Arc::new(Connections {
        dialer: Box::new(Dial(TransportConnector::new(Some(
            ConnectorOptions::from_server_conf(&server.configuration),
        )))),
        pool: Pool::new(pool_size),
    });
    raise_open_file_limit();
    let default_max = default_max_connections();
    let max_connections = config.load().server.max_connections.unwrap_or(default_max);
    let cache = build_cache(&config.load())?;
    let (counters, shared_counters) = build_counters(&config.load(), Arc::clone(&directory.clock))?;
    let shared_cooldowns = match &config.load().cluster.redis {
        Some(url) => Some(Arc::new(
            SharedCooldowns::new(url.expose())
                .map_err(|e| std::io::Error::other(format!("cluster.redis: {e}")))?,
        )),
        None => None,
    };
    let cooldowns: Arc<dyn Cooldowns> = match &shared_cooldowns {
        Some(shared) => Arc::clone(shared) as Arc<dyn Cooldowns>,
        None => Arc::new(LocalCooldowns),
    };
    let gateway = Gateway::new(
        Arc::clone(&config),
        Shared {
            connections: Arc::clone(&connections),
            counters: Arc::clone(&counters),
            keys: Arc::clone(&directory),
            usage: Arc::clone(&usage),
            alerts,
            cache: Arc::clone(&cache),
            cooldowns: cooldowns.clone(),
            tracer: tracer.clone(),
            clock: Arc::clone(&directory.clock),
        },
    );
    let client_listener = ClientListener {
        proxy: Arc::new(pingora_proxy::http_proxy(
            &server.configuration,
            gateway.clone(),
        )),
        server: Arc::new(gateway),
        config: Arc::clone(&config),
        counts: Arc::new(ConnectionCounts::default()),
        default_max,
    };
    // Plain listeners are accepted by the gateway's own loop; TLS ones by Pingora's.
    let tls_proxy = (!tls.is_empty())
        .then(|| -> std::io::Result<_> {
            let mut proxy =
                Service::new("tollgate proxy (TLS)".to_string(), client_listener.clone());
            for (t, addr) in tls.iter().zip(&tls_listen) {
                let mut settings = TlsSettings::intermediate(&t.cert, &t.key).map_err(|e| {
                    std::io::Error::other(format!("TLS listener {}: {e}", t.listen))
                })?;
                // HTTP/2 for clients that offer it (ALPN), HTTP/1.1 for the rest.
                settings.enable_h2();
                // Unbuffered: HTTP/1.x writes are gathered by the connection's own buffer,
                // and HTTP/2's by h2; reads go straight to the socket (Pingora's default is
                // a 64 KiB read buffer for the connection's life).
                proxy.add_listener(
                    ListenerConfig::tcp(addr.to_string())
                        .tls(settings)
                        .l4_buffer(L4BufferSettings::unbuffered()),
                );
            }
            proxy.threads = Some(threads);
            Ok(proxy)
        })
        .transpose()?;
    // None when only TLS listeners are configured.
    let proxy = (!listen.is_empty()).then(|| {
        PlainListeners::new(
            "tollgate proxy",
            listen.iter().map(ToString::to_string).collect(),
            client_listener,
            threads,
        )
    });

    let reloader = mode.config_path.as_ref().map(|path| {
        let (usage, directory) = (Arc::clone(&usage), Arc::clone(&directory));
        let after = move |new: &Config| {
            usage.flush_soon();
            // A budget the reload gave a config key starts from its spend so far.
            if let Err(e) = directory.refresh_blocking(new.keys.budgets()) {
                log::error!("reload: cannot re-read keys and spend from the store: {e}");
            }
        };
        Arc::new(Reloader::new(Arc::clone(&config), path.clone()).with_after(Box::new(after)))
    });
    let mut admin = Service::new(
        "tollgate admin".to_string(),
        AdminApp {
            config: Arc::clone(&config),
            reloader: reloader.clone(),
            keys: Arc::clone(&directory),
            cache,
            cooldowns: cooldowns.clone(),
        },
    );
    admin.add_tcp(&admin_listen.to_string());
    admin.threads = Some(1);

    for upstream in config.load().upstreams.values() {
        upstream.add_health_service(&mut server);
    }
    if let Some(proxy) = proxy {
        server.add_service(proxy_sockets.serve(proxy));
    }
    if let Some(tls_proxy) = tls_proxy {
        server.add_service(tls_sockets.serve(tls_proxy));
    }
    server.add_service(admin_sockets.serve(admin));
    server.add_service(background_service(
        "resolver",
        Resolver {
            config: Arc::clone(&config),
        },
    ));
    server.add_service(background_service(
        "log writer",
        crate::observe::LogWriter {
            interval: config.load().log.flush_interval,
        },
    ));
    server.add_service(background_service(
        "idle upstream connections",
        Sweeper(connections),
    ));
    let store = directory.store.clone();
    if !mode.daemon {
        // Connected before serving, so the process's open files are steady from the first
        // request (a daemon connects after its fork, in the writer).
        if let Err(e) = store.connect_blocking() {
            log::error!("store: cannot connect ({e}); usage rows wait in the queue");
        }
    }
    server.add_service(background_service(
        "usage writer",
        Writer {
            queue: Arc::clone(&usage),
            store: store.clone(),
            interval: flush_interval,
        },
    ));
    if let Ok(crate::store::Location::Postgres(url)) =
        crate::store::location(&config.load().store.url)
    {
        server.add_service(background_service(
            "key changes",
            crate::keys::follow::Follower {
                directory: Arc::clone(&directory),
                settings: {
                    let config = Arc::clone(&config);
                    Arc::new(move || {
                        let c = config.load();
                        (c.store.refresh_interval, c.keys.budgets())
                    })
                },
                url,
            },
        ));
    }
    if let Some(shared) = shared_cooldowns {
        server.add_service(background_service(
            "shared cooldowns",
            CooldownListener(shared, Arc::clone(&config)),
        ));
    }
    if let Some(shared) = shared_counters {
        server.add_service(background_service(
            "limit slots heartbeat",
            Heartbeat(shared),
        ));
    }
    if let Some(d) = delivery {
        server.add_service(background_service("budget alerts", d));
    }
    if let (Some(reloader), Some(path)) = (reloader, &mode.config_path) {
        server.add_service(background_service(
            "reload on SIGHUP",
            HangupReload(reloader),
        ));
        match std::env::current_exe() {
            Ok(exe) => {
                server.add_service(background_service(
                    "upgrade on SIGUSR2",
                    Upgrader {
                        exe,
                        config_path: path.clone(),
                        daemon: mode.daemon,
                    },
                ));
            }
            Err(e) => log::warn!("cannot find the binary's path ({e}): SIGUSR2 upgrades are off"),
        }
    }

    log::info!("{summary}; at most {max_connections} client connections");
    println!(
        "tollgate: listening on {}",
        listen
            .iter()
            .map(|a| format!("http://{a}"))
            .chain(tls_listen.iter().map(|a| format!("https://{a}")))
            .collect::<Vec<_>>()
            .join(" ")
    );
    println!("tollgate: admin on http://{admin_listen}");
    println!("tollgate: pid {}", std::process::id());
    let _ = std::io::stdout().flush();
    Ok((server, usage, store, tracer))
}

/// The limit counters: in this process, or shared through `cluster.redis` (then also
/// returned for the heartbeat that keeps its slots alive).
type Counters = (Arc<dyn CounterBackend>, Option<Arc<RedisCounters>>);

fn build_counters(config: &Config, clock: Arc<dyn Clock>) -> std::io::Result<Counters> {
    let Some(url) = &config.cluster.redis else {
        return Ok((Arc::new(LocalCounters::default()), None));
    };
    let c = &config.cluster;
    let options = crate::limits::SharedOptions {
        on_error: c.on_redis_error,
        instances: c.expected_instances,
        slot_ttl: c.slot_ttl,
        leases: c.leases,
        clock,
    };
    let shared = RedisCounters::new(url.expose(), options)
        .map_err(|e| std::io::Error::other(mask_userinfo(&format!("cluster.redis: {e}"))))?;
    let shared = Arc::new(shared);
    Ok((Arc::clone(&shared) as Arc<dyn CounterBackend>, Some(shared)))
}

/// Applies the cooldowns other instances share.
struct CooldownListener(Arc<SharedCooldowns>, Arc<ArcSwap<Config>>);

#[async_trait]
impl BackgroundService for CooldownListener {
    async fn start(&self, shutdown: ShutdownWatch) {
        let config = Arc::clone(&self.1);
        let servers: crate::upstream::shared::ServersNow = Arc::new(move || {
            let c = config.load();
            c.upstreams
                .values()
                .flat_map(|u| u.servers.iter().cloned())
                .collect()
        });
        self.0.listen(servers, shutdown).await;
    }
}

/// Keeps the slots and reservations this process holds in Redis alive, closes its leases
/// when their time is up, and gives back their unused units when the process stops.
struct Heartbeat(Arc<RedisCounters>);

#[async_trait]
impl BackgroundService for Heartbeat {
    async fn start(&self, mut shutdown: ShutdownWatch) {
        let mut sweep = tokio::time::interval(Duration::from_millis(250));
        sweep.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut beat = tokio::time::interval(self.0.beat_every());
        beat.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = shutdown.changed() => {
                    self.0.close_leases().await;
                    return;
                }
                _ = sweep.tick() => self.0.sweep(),
                _ = self.0.ahead_ready.notified() => self.0.renew().await,
                _ = beat.tick() => self.0.beat().await,
            }
        }
    }
}

/// The response cache's backend, from the config at start (a reload does not move it).
fn build_cache(config: &Config) -> std::io::Result<Arc<dyn CacheBackend>> {
    use crate::spec::CacheBackendKind;
    match (config.cache.backend, &config.cluster.redis) {
        (CacheBackendKind::Redis, Some(url)) => {
            let c = RedisCache::new(url.expose()).map_err(|e| {
                std::io::Error::other(mask_userinfo(&format!("cluster.redis: {e}")))
            })?;
            Ok(Arc::new(c))
        }
        _ => Ok(Arc::new(MemoryCache::new(config.cache.max_size))),
    }
}

fn summary(config: &Config, listen: &[SocketAddr], admin: SocketAddr) -> String {
    let upstreams: Vec<String> = config
        .upstreams
        .values()
        .map(|u| format!("{} ({} servers)", u.name, u.servers.len()))
        .collect();
    let mut aliases = config.router.alias_names().join(", ");
    if config.router.has_catch_all() {
        aliases.push_str(if aliases.is_empty() { "*" } else { ", *" });
    }
    format!(
        "starting: proxy on {listen:?}, admin on {admin}, {} config keys, upstreams: {}; models: {}",
        config.keys.len(),
        upstreams.join(", "),
        aliases
    )
}

/// Re-resolves upstream host names in the background, so that DNS changes are followed
/// and no lookup ever happens on the request path.
struct Resolver {
    config: Arc<ArcSwap<Config>>,
}

const RESOLVE_EVERY: Duration = Duration::from_secs(30);

#[async_trait]
impl BackgroundService for Resolver {
    async fn start(&self, mut shutdown: ShutdownWatch) {
        loop {
            tokio::select! {
                _ = shutdown.changed() => return,
                _ = tokio::time::sleep(RESOLVE_EVERY) => {}
            }
            let config = self.config.load_full();
            for upstream in config.upstreams.values() {
                for server in &upstream.servers {
                    if let Err(e) = server.endpoint.resolve().await {
                        log::warn!("server {}: cannot resolve: {e}", server.name);
                    }
                }
            }
        }
    }
}
