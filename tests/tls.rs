//! TLS on both sides: an https upstream (rustls with SNI, the certificate checked against
//! `server.ca_file`, pooled connections reused; an untrusted certificate is a connect
//! failure that moves on), and a TLS listener serving HTTP/2 and HTTP/1.1 clients (curl).

// Helpers outside #[test] functions stop the test loudly on a failed step.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use common::{chat, client, Gateway};
use tollgate::demo::mock::MockUpstream;

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

fn curl(args: &[&str]) -> (String, String) {
    let out = std::process::Command::new("curl")
        .args(args)
        .output()
        .expect("curl");
    assert!(
        out.status.success(),
        "curl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    (
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// A gateway with one TLS listener (port 0) besides the plain ones in `listen`, in front
/// of a mock upstream; the certificate's file is the CA a client trusts.
async fn tls_gateway(listen: &str) -> (Gateway, MockUpstream, tempfile::TempDir, String) {
    let (cert, key) = certificate();
    let up = MockUpstream::start("the mock upstream").await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let (cert_path, key_path) = (dir.path().join("c.pem"), dir.path().join("k.pem"));
    std::fs::write(&cert_path, &cert).unwrap();
    std::fs::write(&key_path, &key).unwrap();
    let gw = Gateway::start(&format!(
        "server:\n  listen: [{listen}]\n  admin_listen: \"127.0.0.1:0\"\n  threads: 1\n  grace_period: 0s\n  tls:\n    - {{listen: \"127.0.0.1:0\", cert: {}, key: {}}}\nupstreams:\n  u:\n    servers: [{{url: \"{}\"}}]\nmodels:\n  m:\n    routes: [{{upstream: u}}]\n",
        cert_path.display(),
        key_path.display(),
        up.url()
    ));
    let ca = cert_path.display().to_string();
    (gw, up, dir, ca)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tls_listener_serves_http2_and_http1_clients_with_streaming() {
    let (gw, up, _dir, ca2) = tls_gateway("\"127.0.0.1:0\"").await;
    // Bound on port 0 and printed with the others.
    let port = gw.tls_addrs[0].rsplit(':').next().unwrap().to_string();
    let url2 = format!("https://localhost:{port}/v1/chat/completions");
    let body = chat("m", false).to_string();
    let stream_body = chat("m", true).to_string();
    let results = tokio::task::spawn_blocking(move || {
        let h2 = curl(&[
            "-sS",
            "-v",
            "--http2",
            "--cacert",
            &ca2,
            "-H",
            "content-type: application/json",
            "-d",
            &body,
            &url2,
        ]);
        let h2_stream = curl(&[
            "-sSN",
            "--http2",
            "--cacert",
            &ca2,
            "-H",
            "content-type: application/json",
            "-d",
            &stream_body,
            &url2,
        ]);
        let h1 = curl(&[
            "-sS",
            "-v",
            "--http1.1",
            "--cacert",
            &ca2,
            "-H",
            "content-type: application/json",
            "-d",
            &body,
            &url2,
        ]);
        (h2, h2_stream, h1)
    })
    .await
    .unwrap();
    let ((h2_out, h2_err), (stream_out, _), (h1_out, h1_err)) = results;
    assert!(h2_err.contains("< HTTP/2 200"), "{h2_err}");
    assert!(h2_out.contains("Hello from the mock upstream"), "{h2_out}");
    assert!(
        stream_out.trim_end().ends_with("data: [DONE]"),
        "{stream_out}"
    );
    assert!(stream_out.matches("data: ").count() > 5, "{stream_out}");
    assert!(h1_err.contains("< HTTP/1.1 200"), "{h1_err}");
    assert!(h1_out.contains("Hello from the mock upstream"));
    assert_eq!(up.hits(), 3);
    drop(gw);
}

/// With only TLS listeners configured, the gateway starts (no plain-TCP service at all)
/// and serves both HTTP versions on the TLS one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gateway_with_only_tls_listeners_serves_both_http_versions() {
    let (gw, up, _dir, ca) = tls_gateway("").await;
    assert_eq!(gw.tls_addrs.len(), 1);
    let port = gw.tls_addrs[0].rsplit(':').next().unwrap().to_string();
    let url = format!("https://localhost:{port}/v1/chat/completions");
    let body = chat("m", false).to_string();
    let answers = tokio::task::spawn_blocking(move || {
        ["--http1.1", "--http2"].map(|version| {
            curl(&[
                "-sS",
                "-v",
                version,
                "--cacert",
                &ca,
                "-H",
                "content-type: application/json",
                "-d",
                &body,
                &url,
            ])
        })
    })
    .await
    .unwrap();
    let [(h1_out, h1_err), (h2_out, h2_err)] = answers;
    assert!(h1_err.contains("< HTTP/1.1 200"), "{h1_err}");
    assert!(h2_err.contains("< HTTP/2 200"), "{h2_err}");
    for out in [h1_out, h2_out] {
        assert!(out.contains("Hello from the mock upstream"), "{out}");
    }
    assert_eq!(up.hits(), 2);
}
