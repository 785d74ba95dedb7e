//! An https upstream: rustls with SNI, the certificate checked against `server.ca_file`,
//! pooled connections reused; an untrusted certificate is a connect failure that moves on.

mod common;

use common::{chat, client, Gateway};
use tollgate::mock::MockUpstream;

fn certificate() -> (String, String) {
    let cert = rcgen::generate_simple_self_signed(vec!["localhost".to_string()]).unwrap();
    (cert.cert.pem(), cert.key_pair.serialize_pem())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_https_upstream_is_reached_with_sni_and_the_configured_ca() {
    let (cert, key) = certificate();
    let tls = MockUpstream::start_tls("tls", &cert, &key).await.unwrap();
    let plain = MockUpstream::start("plain").await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let ca = dir.path().join("ca.pem");
    std::fs::write(&ca, &cert).unwrap();
    let gw = Gateway::start(&format!(
        "server:\n  listen: [\"127.0.0.1:0\"]\n  admin_listen: \"127.0.0.1:0\"\n  threads: 1\n  grace_period: 0s\n  ca_file: {}\nupstreams:\n  secure:\n    provider: openai\n    servers: [{{url: \"https://localhost:{}/v1\", api_key: sk-tls-test-0000000000}}]\nmodels:\n  m:\n    routes: [{{upstream: secure}}]\n",
        ca.display(),
        tls.addr.port()
    ));
    let c = client();
    for _ in 0..5 {
        let r = c
            .post(gw.url("/v1/chat/completions"))
            .json(&chat("m", false))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
        assert!(r.text().await.unwrap().contains("Hello from tls"));
    }
    assert_eq!(tls.hits(), 5);
    assert_eq!(tls.connections(), 1, "pooled TLS connection reused");
    let got = tls.last().unwrap();
    assert_eq!(
        got.headers["host"],
        format!("localhost:{}", tls.addr.port())
    );
    assert_eq!(
        got.headers["authorization"],
        "Bearer sk-tls-test-0000000000"
    );

    // Without the CA the certificate is not trusted: the attempt fails and the next tier serves.
    let gw = Gateway::start(&format!(
        "upstreams:\n  secure:\n    servers: [{{url: \"https://localhost:{}/v1\"}}]\n  plain:\n    servers: [{{url: \"{}\"}}]\nmodels:\n  m:\n    routes:\n      - {{upstream: secure, priority: 1}}\n      - {{upstream: plain, priority: 2}}\n",
        tls.addr.port(),
        plain.url()
    ));
    let r = c
        .post(gw.url("/v1/chat/completions"))
        .json(&chat("m", false))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["x-tollgate-attempts"], "2");
    assert_eq!(tls.hits(), 5);
    assert_eq!(plain.hits(), 1);
}

#[test]
fn a_ca_file_that_is_not_a_certificate_bundle_is_a_config_error() {
    let dir = tempfile::tempdir().unwrap();
    let ca = dir.path().join("ca.pem");
    std::fs::write(&ca, "not a certificate\n").unwrap();
    let conf = dir.path().join("t.yaml");
    std::fs::write(
        &conf,
        format!("server:\n  ca_file: {}\nupstreams:\n  u:\n    servers: [{{url: \"https://localhost:1/v1\"}}]\nmodels:\n  m:\n    routes: [{{upstream: u}}]\n", ca.display()),
    )
    .unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_tollgate"))
        .arg("-t")
        .arg("-c")
        .arg(&conf)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("server.ca_file"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}
