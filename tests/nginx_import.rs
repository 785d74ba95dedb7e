//! `tollgate import-nginx` on realistic configs: the resulting config (which must pass
//! `tollgate -t`) and the warnings, each with its file and line.

// Helpers outside #[test] functions stop the test loudly on a failed step.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use serde_yaml::Value;
use std::path::{Path, PathBuf};
use std::process::Command;

struct Imported {
    config: Value,
    warnings: Vec<String>,
    dir: tempfile::TempDir,
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let p = e.unwrap().path();
        let dest = to.join(p.file_name().unwrap());
        if p.is_dir() {
            copy_dir(&p, &dest);
        } else {
            std::fs::copy(&p, &dest).unwrap();
        }
    }
}

/// Imports `tests/nginx/NAME/nginx.conf` from a copy in a temp dir, and checks the
/// result with `tollgate -t` (with `env` set).
fn import(name: &str, prepare: impl FnOnce(&Path), env: &[(&str, &str)]) -> Imported {
    let dir = tempfile::tempdir().unwrap();
    copy_dir(
        &PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/tests/nginx")).join(name),
        dir.path(),
    );
    prepare(dir.path());
    let conf = dir.path().join("nginx.conf");
    let out = Command::new(env!("CARGO_BIN_EXE_tollgate"))
        .arg("import-nginx")
        .arg(&conf)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr).to_string();
    assert!(out.status.success(), "{stderr}");
    let yaml = String::from_utf8(out.stdout).unwrap();
    let written = dir.path().join("tollgate.yaml");
    std::fs::write(&written, &yaml).unwrap();
    let check = Command::new(env!("CARGO_BIN_EXE_tollgate"))
        .arg("-t")
        .arg("-c")
        .arg(&written)
        .envs(env.iter().copied())
        .output()
        .unwrap();
    assert!(
        check.status.success(),
        "the imported config fails -t:\n{}\n{yaml}",
        String::from_utf8_lossy(&check.stderr)
    );
    let warnings = stderr
        .lines()
        .filter(|l| !l.starts_with("tollgate:"))
        .map(|l| l.replacen(&format!("{}/", dir.path().display()), "", 1))
        .collect();
    Imported {
        config: serde_yaml::from_str(&yaml).unwrap(),
        warnings,
        dir,
    }
}

fn has(warnings: &[String], needle: &str) -> bool {
    warnings.iter().any(|w| w.contains(needle))
}

#[test]
fn the_typical_llm_front_becomes_a_least_conn_upstream_behind_the_catch_all() {
    let i = import("typical", |_| {}, &[]);
    let u = &i.config["upstreams"]["llm_backend"];
    assert_eq!(u["balance"], "least_conn");
    assert_eq!(u["connect_timeout"], "10s");
    assert_eq!(u["first_byte_timeout"], "300s");
    assert_eq!(u["idle_timeout"], "300s");
    let servers = u["servers"].as_sequence().unwrap();
    assert_eq!(servers.len(), 3);
    assert_eq!(servers[0]["url"], "http://llm-worker-1:8000/v1");
    assert_eq!(servers[0]["weight"], 3);
    assert_eq!(servers[2]["backup"], true);
    assert_eq!(i.config["server"]["upstream_pool_size"], 32);
    assert_eq!(i.config["server"]["max_body_size"], "1MiB");
    assert_eq!(
        i.config["models"]["*"]["routes"][0]["upstream"],
        "llm_backend"
    );
    assert!(
        has(
            &i.warnings,
            "nginx.conf:19: location: location /health: Tollgate answers /health"
        ),
        "{:?}",
        i.warnings
    );
    assert!(
        has(
            &i.warnings,
            "nginx.conf:9: listen: ssl listener without ssl_certificate"
        ),
        "{:?}",
        i.warnings
    );
    assert_eq!(i.warnings.len(), 3, "{:?}", i.warnings);
}

#[test]
fn several_upstreams_and_locations_become_upstreams_and_aliases() {
    let i = import("multi", |_| {}, &[]);
    let c = &i.config;
    assert_eq!(
        c["server"]["listen"],
        serde_yaml::from_str::<Value>("[\"0.0.0.0:8080\", \"127.0.0.1:8081\"]").unwrap()
    );
    assert_eq!(c["server"]["threads"], 4);
    assert_eq!(c["server"]["max_body_size"], "20MiB");
    assert_eq!(c["server"]["upstream_pool_size"], 64);
    assert_eq!(c["failover"]["max_attempts"], 3);
    let pool = &c["upstreams"]["openai_pool"];
    assert_eq!(pool["balance"], "weighted");
    assert_eq!(pool["idle_timeout"], "600s");
    assert_eq!(pool["servers"][0]["max_fails"], 3);
    assert_eq!(pool["servers"][0]["fail_timeout"], "30s");
    assert_eq!(pool["servers"][1]["max_conns"], 64);
    let llama = &c["upstreams"]["local_llama"];
    assert_eq!(llama["balance"], "least_conn");
    assert_eq!(llama["connect_timeout"], "2s");
    assert_eq!(llama["servers"][1]["max_fails"], 0);
    assert_eq!(c["models"]["*"]["routes"][0]["upstream"], "openai_pool");
    assert_eq!(
        c["models"]["local_llama"]["routes"][0]["upstream"],
        "local_llama"
    );
    assert!(
        has(
            &i.warnings,
            "nginx.conf:32: location: location /llama/: Tollgate serves the OpenAI paths under /v1"
        ),
        "{:?}",
        i.warnings
    );
    assert_eq!(i.warnings.len(), 1, "{:?}", i.warnings);
}

#[test]
fn includes_are_followed_and_warnings_name_the_included_file() {
    let i = import(
        "includes",
        |d| std::fs::write(d.join("mime.types"), "types { text/html html; }\n").unwrap(),
        &[("VLLM_API_KEY", "sk-from-env")],
    );
    let c = &i.config;
    assert_eq!(c["server"]["listen"][0], "0.0.0.0:80");
    assert_eq!(c["server"]["max_body_size"], "64MiB");
    let vllm = &c["upstreams"]["vllm"];
    assert_eq!(vllm["servers"].as_sequence().unwrap().len(), 2);
    // The inline credential is not copied: it becomes an environment reference.
    assert_eq!(vllm["servers"][0]["api_key"], "${VLLM_API_KEY}");
    let yaml = std::fs::read_to_string(i.dir.path().join("tollgate.yaml")).unwrap();
    assert!(!yaml.contains("sk-inline-secret"));
    assert!(
        has(
            &i.warnings,
            "conf.d/10-upstreams.conf:4: hash: sticky or random balancing is not supported"
        ),
        "{:?}",
        i.warnings
    );
    assert!(has(&i.warnings, "conf.d/20-site.conf:6: proxy_set_header: the upstream credential becomes api_key: ${VLLM_API_KEY}"), "{:?}", i.warnings);
    assert!(
        has(
            &i.warnings,
            "nginx.conf:1: user: process settings belong to the systemd unit"
        ),
        "{:?}",
        i.warnings
    );
    assert_eq!(c["models"]["*"]["routes"][0]["upstream"], "vllm");
}

#[test]
fn every_unsupported_directive_is_reported_with_its_line() {
    let i = import("unsupported", |_| {}, &[]);
    let expect = [
        "nginx.conf:2: map: not translated",
        "nginx.conf:3: limit_req_zone: not translated; use Tollgate's limits",
        "nginx.conf:6: ip_hash: sticky or random balancing is not supported",
        "nginx.conf:7: server: server parameter slow_start is not supported",
        "nginx.conf:8: server: server 10.1.0.2:8000 is marked down: left out",
        "nginx.conf:9: server: unix socket servers are not supported",
        "nginx.conf:11: keepalive_requests: pooled connections",
        "nginx.conf:17: limit_req: not translated; use Tollgate's limits",
        "nginx.conf:18: rewrite: not translated",
        "nginx.conf:20: proxy_next_upstream_timeout: failover is bounded",
        "nginx.conf:21: proxy_set_header: extra upstream headers are not supported",
    ];
    for e in expect {
        assert!(has(&i.warnings, e), "missing {e:?} in {:#?}", i.warnings);
    }
    assert_eq!(i.warnings.len(), expect.len(), "{:#?}", i.warnings);
    let servers = i.config["upstreams"]["pool"]["servers"]
        .as_sequence()
        .unwrap();
    let urls: Vec<&str> = servers.iter().map(|s| s["url"].as_str().unwrap()).collect();
    assert_eq!(urls, ["http://10.1.0.1:8000/v1", "http://10.1.0.3:8000/v1"]);
}

#[test]
fn tls_listeners_carry_their_certificates() {
    let i = import(
        "tls",
        |d| {
            std::fs::create_dir_all(d.join("certs")).unwrap();
            std::fs::write(d.join("certs/llm.crt"), "certificate placeholder\n").unwrap();
            std::fs::write(d.join("certs/llm.key"), "key placeholder\n").unwrap();
        },
        &[],
    );
    let c = &i.config;
    assert_eq!(c["server"]["listen"][0], "0.0.0.0:80");
    let tls = &c["server"]["tls"][0];
    assert_eq!(tls["listen"], "0.0.0.0:443");
    assert!(tls["cert"].as_str().unwrap().ends_with("/certs/llm.crt"));
    assert!(tls["key"].as_str().unwrap().ends_with("/certs/llm.key"));
    assert_eq!(
        c["upstreams"]["gpu_fleet"]["servers"][0]["url"],
        "https://gpu-a.internal:8000/v1"
    );
    assert_eq!(c["upstreams"]["gpu_fleet"]["connect_timeout"], "5s");
    assert!(
        has(
            &i.warnings,
            "nginx.conf:12: ssl_protocols: TLS versions and ciphers are rustls's safe defaults"
        ),
        "{:?}",
        i.warnings
    );
    assert_eq!(i.warnings.len(), 1, "{:?}", i.warnings);
}

#[test]
fn a_broken_file_is_an_error_with_its_line() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("nginx.conf");
    std::fs::write(&p, "http {\n  upstream a {\n    server x:1\n  }\n}\n").unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_tollgate"))
        .arg("import-nginx")
        .arg(&p)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("nginx.conf:4: missing ; after server"));
}

/// Regression: a site whose only listener is `listen 443 ssl` was imported without
/// `server.listen`, so Tollgate's default plain listener opened as well.
#[test]
fn a_tls_only_site_opens_no_plain_listener() {
    let i = import(
        "tls_only",
        |d| {
            std::fs::create_dir_all(d.join("certs")).unwrap();
            std::fs::write(d.join("certs/llm.crt"), "certificate placeholder\n").unwrap();
            std::fs::write(d.join("certs/llm.key"), "key placeholder\n").unwrap();
        },
        &[],
    );
    let c = &i.config;
    assert_eq!(c["server"]["listen"], serde_yaml::Value::Sequence(vec![]));
    assert_eq!(c["server"]["tls"][0]["listen"], "0.0.0.0:443");
}
