//! Test harness: starts the real `tollgate` binary on 127.0.0.1:0 with a config written
//! for the test, waits until it answers, and stops it when dropped. Mock upstreams are
//! `tollgate::demo::mock::MockUpstream`, real HTTP servers on loopback in the test's runtime.

#![allow(dead_code)]
// Test harness: a failed set-up step should stop the test loudly.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub struct Gateway {
    child: Child,
    /// Every process id the gateway printed (an upgrade starts a new process).
    pids: std::sync::Arc<std::sync::Mutex<Vec<u32>>>,
    pub addr: String,
    /// The TLS listeners' addresses, in the order of `server.tls`.
    pub tls_addrs: Vec<String>,
    pub admin: String,
    pub dir: tempfile::TempDir,
    pub stderr_path: PathBuf,
}

impl Gateway {
    /// Starts the gateway with `body` appended to a server section that listens on free
    /// loopback ports. `body` holds `keys`, `upstreams`, `models`, ...
    pub fn start(body: &str) -> Gateway {
        Self::start_with_env(body, &[])
    }

    pub fn start_with_env(body: &str, env: &[(&str, &str)]) -> Gateway {
        Self::start_full("", body, env)
    }

    /// Starts the gateway with `server` (indented lines such as `  header_timeout: 1s\n`)
    /// added to the test's server section.
    pub fn start_with_server(server: &str, body: &str) -> Gateway {
        Self::start_full(server, body, &[])
    }

    fn start_full(server_extra: &str, body: &str, env: &[(&str, &str)]) -> Gateway {
        let dir = tempfile::tempdir().expect("tempdir");
        let server = format!(
            "server:\n  listen: [\"127.0.0.1:0\"]\n  admin_listen: \"127.0.0.1:0\"\n  threads: 1\n  grace_period: 0s\n  pid_file: {d}/tollgate.pid\n  upgrade_sock: {d}/upgrade.sock\n{server_extra}",
            d = dir.path().display()
        );
        let mut text = if body.contains("server:") {
            body.to_string()
        } else {
            format!("{server}{body}")
        };
        // Each gateway gets its own database in its temporary directory.
        if !text.contains("\nstore:") && !text.starts_with("store:") {
            // First, so that a test appending to the file still extends its last section.
            text = format!(
                "store:\n  url: sqlite://{}/tollgate.db\n{text}",
                dir.path().display()
            );
        }
        let path = dir.path().join("tollgate.yaml");
        std::fs::write(&path, text).expect("write config");
        let stderr_path = dir.path().join("stderr.log");
        let stderr = std::fs::File::create(&stderr_path).expect("stderr file");
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_tollgate"));
        cmd.arg("-c")
            .arg(&path)
            .stdout(Stdio::piped())
            .stderr(stderr);
        cmd.env("RUST_LOG", "info");
        for (k, v) in env {
            cmd.env(k, v);
        }
        let mut child = cmd.spawn().expect("spawn tollgate");
        let stdout = child.stdout.take().expect("stdout");
        let mut lines = BufReader::new(stdout).lines();
        let mut addr = String::new();
        let mut tls_addrs = Vec::new();
        let mut admin = String::new();
        // A gateway with only TLS listeners prints no plain address.
        while (addr.is_empty() && tls_addrs.is_empty()) || admin.is_empty() {
            let Some(Ok(line)) = lines.next() else {
                let _ = child.kill();
                panic!(
                    "gateway exited before listening; stderr:\n{}",
                    std::fs::read_to_string(&stderr_path).unwrap_or_default()
                );
            };
            if let Some(urls) = line.strip_prefix("tollgate: listening on ") {
                for url in urls.split_whitespace() {
                    if let Some(a) = url.strip_prefix("https://") {
                        tls_addrs.push(a.to_string());
                    } else if let Some(a) = url.strip_prefix("http://") {
                        if addr.is_empty() {
                            addr = a.to_string();
                        }
                    }
                }
            } else if let Some(a) = line.strip_prefix("tollgate: admin on http://") {
                admin = a.trim().to_string();
            }
        }
        // Keep draining stdout so the child never blocks on a full pipe, noting new pids.
        let pids = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let seen = pids.clone();
        std::thread::spawn(move || {
            for line in lines.map_while(Result::ok) {
                if let Some(pid) = line
                    .strip_prefix("tollgate: pid ")
                    .and_then(|p| p.trim().parse().ok())
                {
                    seen.lock().unwrap().push(pid);
                }
            }
        });
        let gw = Gateway {
            child,
            pids,
            addr,
            tls_addrs,
            admin,
            dir,
            stderr_path,
        };
        gw.wait_ready();
        gw
    }

    fn wait_ready(&self) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            // Listeners on port 0 are bound before the server runs: wait for the admin
            // listener to answer (a request to the proxy would be in the access log).
            let proxy = self.tls_addrs.first().filter(|_| self.addr.is_empty());
            let proxy = proxy.unwrap_or(&self.addr);
            if answers(&self.admin) && std::net::TcpStream::connect(proxy).is_ok() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        panic!("gateway did not start listening on {}", self.addr);
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.addr, path)
    }

    pub fn admin_url(&self, path: &str) -> String {
        format!("http://{}{}", self.admin, path)
    }

    /// Everything the gateway logged so far. While it serves, its lines are written in
    /// batches at least every 100 ms: this waits out one batch, so a line logged before
    /// the call is in the answer.
    pub fn logs(&self) -> String {
        std::thread::sleep(Duration::from_millis(150));
        std::fs::read_to_string(&self.stderr_path).unwrap_or_default()
    }
}

impl Gateway {
    /// The first process's id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Process ids printed so far (the first, then any started by an upgrade).
    pub fn pids(&self) -> Vec<u32> {
        self.pids.lock().unwrap().clone()
    }
}

impl Gateway {
    /// Stops the gateway the way systemd does (SIGTERM) and waits for it to exit.
    pub fn terminate(&mut self) -> std::process::ExitStatus {
        let _ = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "the gateway did not exit after SIGTERM"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Gateway {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() {
            // A failing test shows what the gateway said (the test output is captured).
            eprintln!("--- gateway output ---\n{}--- end ---", self.logs());
        }
        // Processes started by an upgrade; only ones that still run this binary (a pid
        // can be reused once its process is gone).
        let own = self.child.id();
        for pid in self.pids().into_iter().filter(|p| *p != own) {
            let running_us = std::fs::read(format!("/proc/{pid}/cmdline"))
                .is_ok_and(|c| String::from_utf8_lossy(&c).contains("tollgate"));
            if running_us {
                let _ = Command::new("kill")
                    .args(["-KILL", &pid.to_string()])
                    .status();
            }
        }
    }
}

/// Whether an HTTP server at `addr` answers `GET /health` within a second.
fn answers(addr: &str) -> bool {
    use std::io::{Read, Write};
    let Ok(mut s) = std::net::TcpStream::connect(addr) else {
        return false;
    };
    let _ = s.set_read_timeout(Some(Duration::from_secs(1)));
    if s.write_all(b"GET /health HTTP/1.1\r\nhost: t\r\nconnection: close\r\n\r\n")
        .is_err()
    {
        return false;
    }
    let mut first = [0u8; 5];
    s.read_exact(&mut first).is_ok() && &first == b"HTTP/"
}

/// A loopback port with nothing listening on it (connections are refused).
/// A loopback port that refuses every connection for as long as this lives: bound, so
/// nothing else can take it, but never listening (a port bound and released could be
/// taken by another test before it is used).
#[allow(dead_code)]
pub struct RefusingPort {
    _socket: tokio::net::TcpSocket,
    pub port: u16,
}

#[allow(dead_code)]
impl RefusingPort {
    pub fn new() -> RefusingPort {
        let socket = tokio::net::TcpSocket::new_v4().expect("socket");
        socket.bind("127.0.0.1:0".parse().unwrap()).expect("bind");
        let port = socket.local_addr().expect("addr").port();
        RefusingPort {
            _socket: socket,
            port,
        }
    }
}

pub fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .timeout(Duration::from_secs(30))
        .build()
        .expect("client")
}

pub fn chat(model: &str, stream: bool) -> serde_json::Value {
    serde_json::json!({"model": model, "stream": stream, "messages": [{"role": "user", "content": "hello"}]})
}

/// Polls `cond` until it holds or `within` passes.
pub async fn eventually(within: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + within;
    while Instant::now() < deadline {
        if cond() {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    cond()
}

/// Like [`eventually`], for a condition that must itself wait (an HTTP call).
pub async fn eventually_async<F, Fut>(within: Duration, mut cond: F) -> bool
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + within;
    while Instant::now() < deadline {
        if cond().await {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    cond().await
}

/// A config with one upstream `u` (one server at `url`) behind alias `m`.
pub fn single(url: &str) -> String {
    format!("upstreams:\n  u:\n    servers: [{{url: \"{url}\"}}]\nmodels:\n  m:\n    routes: [{{upstream: u}}]\n")
}

/// A config with alias `m` over two tiers: upstream `first` (priority 1, with `first_extra`
/// settings such as `first_byte_timeout: 300ms, `) and upstream `second` (priority 2).
pub fn two_tiers(first: &str, second: &str, first_extra: &str) -> String {
    format!(
        "upstreams:\n  first: {{{first_extra}servers: [{{url: \"{first}\"}}]}}\n  second: {{servers: [{{url: \"{second}\"}}]}}\nmodels:\n  m:\n    routes:\n      - {{upstream: first, priority: 1}}\n      - {{upstream: second, priority: 2}}\n"
    )
}

/// Posts a chat completion for `model` to the gateway (no client key).
pub async fn send_chat(gw: &Gateway, model: &str, stream: bool) -> reqwest::Response {
    client()
        .post(gw.url("/v1/chat/completions"))
        .json(&chat(model, stream))
        .send()
        .await
        .expect("request to the gateway")
}

/// The status of a non-streaming chat completion for `model` sent with `c`.
pub async fn chat_status(c: &reqwest::Client, gw: &Gateway, model: &str) -> reqwest::StatusCode {
    c.post(gw.url("/v1/chat/completions"))
        .json(&chat(model, false))
        .send()
        .await
        .expect("request to the gateway")
        .status()
}

/// The JSON answer of a GET on the admin listener.
pub async fn admin_json(c: &reqwest::Client, gw: &Gateway, path: &str) -> serde_json::Value {
    c.get(gw.admin_url(path))
        .send()
        .await
        .expect("request to the admin listener")
        .json()
        .await
        .expect("a JSON answer")
}

/// The JSON answer of a GET on `url` with a bearer credential.
#[allow(dead_code)]
pub async fn get_json_as(url: String, bearer: &str) -> serde_json::Value {
    client()
        .get(url)
        .bearer_auth(bearer)
        .send()
        .await
        .expect("a GET request")
        .json()
        .await
        .expect("a JSON answer")
}

/// The admin listener's `/metrics` text.
pub async fn scrape(gw: &Gateway) -> String {
    client()
        .get(gw.admin_url("/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap()
}

/// A Redis server of the test's own, on a unix socket in a temporary directory.
pub struct Redis {
    child: std::process::Child,
    _dir: tempfile::TempDir,
    pub url: String,
}

impl Redis {
    pub fn start() -> Redis {
        Self::start_in(tempfile::tempdir().unwrap())
    }

    /// Starts (again) on the socket of `dir`.
    pub fn start_in(dir: tempfile::TempDir) -> Redis {
        let sock = dir.path().join("redis.sock");
        let child = std::process::Command::new("redis-server")
            .args(["--port", "0", "--unixsocket"])
            .arg(&sock)
            .args(["--save", "", "--appendonly", "no", "--dir"])
            .arg(dir.path())
            .stdout(std::process::Stdio::null())
            .spawn()
            .expect("redis-server (see scripts/bootstrap)");
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while !sock.exists() {
            assert!(
                std::time::Instant::now() < deadline,
                "redis-server did not start"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        Redis {
            child,
            url: format!("redis+unix://{}", sock.display()),
            _dir: dir,
        }
    }
}

impl Redis {
    /// What `redis-cli` prints for `args` against this server.
    #[allow(dead_code)]
    pub fn cli(&self, args: &[&str]) -> String {
        let sock = self.url.trim_start_matches("redis+unix://");
        let out = std::process::Command::new("redis-cli")
            .args(["-s", sock])
            .args(args)
            .output()
            .unwrap();
        assert!(out.status.success());
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Concurrency slots held in this server now (the amounts of the `r:ID` reservations
    /// of the `*:inflight` hashes, leases included).
    #[allow(dead_code)]
    pub fn slots_held(&self) -> usize {
        self.cli(&["--scan", "--pattern", "*:inflight"])
            .lines()
            .flat_map(|k| {
                self.cli(&["hvals", k])
                    .lines()
                    .filter_map(|v| v.split(':').next()?.parse::<usize>().ok())
                    .collect::<Vec<_>>()
            })
            .sum()
    }

    /// Stops the server and keeps its directory, to start it again on the same socket.
    pub fn stop(mut self) -> tempfile::TempDir {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_file(self._dir.path().join("redis.sock"));
        let dir = tempfile::tempdir().unwrap();
        std::mem::replace(&mut self._dir, dir)
    }
}

impl Drop for Redis {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A PostgreSQL server of the test's own: a fresh cluster (`initdb`) in a temporary
/// directory, listening only on a unix socket there, run as the unprivileged `postgres`
/// user when the tests run as root, and stopped by pid.
pub struct Postgres {
    child: std::process::Child,
    _dir: tempfile::TempDir,
    /// `postgres://tollgate@localhost/postgres?host=DIR&port=5432` (the socket in DIR).
    pub url: String,
}

/// Where Debian keeps the server's programs (`/usr/lib/postgresql/VERSION/bin`), newest
/// version first; else they are looked up on PATH.
fn postgres_bin(program: &str) -> std::path::PathBuf {
    let mut versions: Vec<(u32, std::path::PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let v = e.file_name().to_str()?.parse::<u32>().ok()?;
            Some((v, e.path().join("bin").join(program)))
        })
        .filter(|(_, p)| p.exists())
        .collect();
    versions.sort();
    versions.pop().map_or_else(|| program.into(), |(_, p)| p)
}

/// Whether this process runs as root (its effective uid, from /proc).
fn is_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            let line = s.lines().find(|l| l.starts_with("Uid:"))?.to_string();
            Some(line.split_whitespace().nth(2) == Some("0"))
        })
        .unwrap_or(false)
}

/// A command run as the `postgres` user when this process is root (PostgreSQL refuses to
/// run as root); `setpriv` executes it in place, so its pid is the server's.
fn unprivileged(program: &str) -> std::process::Command {
    let bin = postgres_bin(program);
    if is_root() {
        let mut c = std::process::Command::new("setpriv");
        c.args([
            "--reuid=postgres",
            "--regid=postgres",
            "--init-groups",
            "--",
        ])
        .arg(bin);
        c
    } else {
        std::process::Command::new(bin)
    }
}

impl Postgres {
    pub fn start() -> Postgres {
        let dir = tempfile::tempdir().unwrap();
        if is_root() {
            let ok = std::process::Command::new("chown")
                .arg("postgres:postgres")
                .arg(dir.path())
                .status()
                .expect("chown");
            assert!(ok.success(), "chown postgres (see scripts/bootstrap)");
        }
        let data = dir.path().join("data");
        let out = unprivileged("initdb")
            .arg("-D")
            .arg(&data)
            .args([
                "-U",
                "tollgate",
                "--auth=trust",
                "--no-locale",
                "-E",
                "UTF8",
                "--no-sync",
            ])
            .output()
            .expect("initdb (see scripts/bootstrap)");
        assert!(
            out.status.success(),
            "initdb failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let child = unprivileged("postgres")
            .arg("-D")
            .arg(&data)
            .arg("-k")
            .arg(dir.path())
            .args([
                "-c",
                "listen_addresses=",
                "-c",
                "fsync=off",
                "-c",
                "max_connections=100",
            ])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("postgres (see scripts/bootstrap)");
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        loop {
            let ready = std::process::Command::new(postgres_bin("pg_isready"))
                .arg("-q")
                .arg("-h")
                .arg(dir.path())
                .args(["-p", "5432", "-U", "tollgate", "-d", "postgres"])
                .status()
                .is_ok_and(|s| s.success());
            if ready {
                break;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "postgres did not start"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        Postgres {
            child,
            url: format!(
                "postgres://tollgate@localhost/postgres?host={}&port=5432",
                dir.path().display()
            ),
            _dir: dir,
        }
    }

    /// Runs `sql` through psql and returns what it printed (unaligned, tuples only).
    pub fn psql(&self, sql: &str) -> String {
        let out = std::process::Command::new(postgres_bin("psql"))
            .arg("-h")
            .arg(self._dir.path())
            .args([
                "-p", "5432", "-U", "tollgate", "-d", "postgres", "-At", "-c", sql,
            ])
            .output()
            .expect("psql");
        assert!(
            out.status.success(),
            "psql: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    }
}

impl Drop for Postgres {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The Python interpreter for the SDK tests: `$TOLLGATE_PYTHON`, else the venv that
/// scripts/bootstrap creates (with the openai and anthropic SDKs), else `python3`.
pub fn python() -> String {
    std::env::var("TOLLGATE_PYTHON").unwrap_or_else(|_| {
        let venv = concat!(env!("CARGO_MANIFEST_DIR"), "/target/pyenv/bin/python");
        if std::path::Path::new(venv).exists() {
            venv.to_string()
        } else {
            "python3".to_string()
        }
    })
}

/// Waits, if needed, so that what a test counts in minute windows does not straddle a
/// boundary (shared counters' windows are the wall clock's minutes).
#[allow(dead_code)]
pub async fn away_from_a_minute_boundary() {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("after 1970")
        .as_secs_f64()
        % 60.0;
    if secs > 50.0 {
        tokio::time::sleep(Duration::from_secs_f64(61.0 - secs)).await;
    }
}
