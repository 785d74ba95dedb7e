//! Real clients against the gateway: the official `openai` Python SDK and curl.
//! The Python interpreter is `$TOLLGATE_PYTHON` (set by scripts/bootstrap to a venv
//! with `openai`), else `python3`.

// Helpers outside #[test] functions stop the test loudly on a failed step.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use common::{python, Gateway};
use std::process::Command;
use tollgate::demo::mock::MockUpstream;

fn demo_like(up: &MockUpstream) -> String {
    format!(
        "keys:\n  - {{name: sdk, key: tg-sdk-key-12345678}}\nupstreams:\n  mock:\n    servers: [{{url: \"{}\"}}]\nmodels:\n  demo:\n    routes: [{{upstream: mock, model: mock-model}}]\n",
        up.url()
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_openai_python_sdk_works_through_the_gateway() {
    let up = MockUpstream::start("the mock upstream").await.unwrap();
    let gw = Gateway::start(&demo_like(&up));
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/python/sdk_check.py");
    let base = gw.url("/v1");
    let out = tokio::task::spawn_blocking(move || {
        Command::new(python())
            .args([script, &base, "tg-sdk-key-12345678"])
            .output()
            .expect("run python (see scripts/bootstrap)")
    })
    .await
    .unwrap();
    assert!(
        out.status.success(),
        "openai SDK check failed (scripts/bootstrap installs the SDK):\n{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("sdk ok"));
    // chat, stream, 2 embeddings inputs in one request; models and errors stay local.
    assert_eq!(up.hits(), 3);
    let paths: Vec<String> = up.received().iter().map(|r| r.path.clone()).collect();
    assert_eq!(
        paths,
        [
            "/v1/chat/completions",
            "/v1/chat/completions",
            "/v1/embeddings"
        ]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn curl_uploads_a_large_body_and_streams() {
    let up = MockUpstream::start("the mock upstream").await.unwrap();
    let gw = Gateway::start(&demo_like(&up));
    let dir = tempfile::tempdir().unwrap();
    let body_path = dir.path().join("body.json");
    let filler = "x".repeat(3 << 20);
    let body =
        serde_json::json!({"model": "demo", "messages": [{"role": "user", "content": filler}]})
            .to_string();
    std::fs::write(&body_path, &body).unwrap();
    let url = gw.url("/v1/chat/completions");
    let out = tokio::task::spawn_blocking({
        let url = url.clone();
        let body_path = body_path.clone();
        move || {
            // curl sends `Expect: 100-continue` for a body this large.
            Command::new("curl")
                .args([
                    "-sS",
                    "-v",
                    "--fail-with-body",
                    "-H",
                    "Authorization: Bearer tg-sdk-key-12345678",
                ])
                .args(["-H", "content-type: application/json", "--data-binary"])
                .arg(format!("@{}", body_path.display()))
                .arg(&url)
                .output()
                .expect("curl")
        }
    })
    .await
    .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let trace = String::from_utf8_lossy(&out.stderr);
    assert!(trace.contains("Expect: 100-continue"), "{trace}");
    assert!(trace.contains("HTTP/1.1 100 Continue"), "{trace}");
    let expected = body.replacen(r#""model":"demo""#, r#""model":"mock-model""#, 1);
    assert_eq!(up.last().unwrap().body, expected.as_bytes());
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["model"], "mock-model");

    let out = tokio::task::spawn_blocking(move || {
        Command::new("curl")
            .args([
                "-sSN",
                "--fail-with-body",
                "-H",
                "Authorization: Bearer tg-sdk-key-12345678",
            ])
            .args(["-H", "content-type: application/json", "-d"])
            .arg(r#"{"model":"demo","stream":true,"messages":[{"role":"user","content":"hi"}]}"#)
            .arg(&url)
            .output()
            .expect("curl")
    })
    .await
    .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success());
    assert!(text.trim_end().ends_with("data: [DONE]"), "{text}");
    assert!(text.matches("data: ").count() > 5);
}

/// The OpenAI SDK sends the whole body before reading: a prompt over `max_body_size` must
/// reach it as the 413, once, not as a connection error it would retry. (The SDK's
/// httpx also reads an answer after a failed write, so this passes even without the
/// gateway's lingering read; `hardening::an_early_413_or_401_reaches_a_client_that_is_still_uploading`
/// is the client that does not.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_openai_sdk_gets_the_413_for_a_large_prompt_and_does_not_retry() {
    let up = MockUpstream::start("the mock upstream").await.unwrap();
    let gw = Gateway::start_with_server("  max_body_size: 1MiB\n", &demo_like(&up));
    let script = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/python/sdk_large_body.py"
    );
    let base = gw.url("/v1");
    let out = tokio::task::spawn_blocking(move || {
        Command::new(python())
            .args([script, &base, "tg-sdk-key-12345678"])
            .output()
            .expect("run python (see scripts/bootstrap)")
    })
    .await
    .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains("status 413"),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(up.hits(), 0);
    let answered = gw.logs().matches("status=413").count();
    assert_eq!(answered, 1, "the SDK retried:\n{}", gw.logs());
}
