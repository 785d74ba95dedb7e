//! Prices: a catalogue file (`pricing.file`) under the config's `pricing` and over the
//! shipped table, read again at every reload and refused, entry by entry, when bad;
//! `tollgate pricing` says what each route is charged and where the price came from.

// Helpers outside #[test] functions stop the test loudly on a failed step.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use common::{client, Gateway};
use serde_json::{json, Value};
use std::process::Command;
use tollgate::demo::mock::{MockUpstream, Reply};

fn tollgate(args: &[&str]) -> (bool, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_tollgate"))
        .args(args)
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn catalogue(input: f64, output: f64) -> String {
    json!({"date": "2026-12-01", "prices": {
        "local-llama": {"input": input, "output": output},
        "gpt-4o": {"input": 2.0, "output": 8.0, "cached_input": 1.0},
        "other": {"input": 50.0, "output": 50.0}
    }})
    .to_string()
}

fn models(path: &std::path::Path) -> String {
    format!(
        "models:\n  llama:\n    routes: [{{upstream: u, model: local-llama}}]\n  dated:\n    routes: [{{upstream: u, model: gpt-4o-2024-08-06}}]\n  other:\n    routes: [{{upstream: u, model: other}}]\n  shipped:\n    routes: [{{upstream: u, model: claude-sonnet-4-5-20250929}}]\npricing:\n  file: {}\n  other: {{input: 1.0, output: 1.0}}\n",
        path.display()
    )
}

#[test]
fn the_pricing_command_names_each_routes_price_and_its_source() {
    let dir = tempfile::tempdir().unwrap();
    let prices = dir.path().join("prices.json");
    std::fs::write(&prices, catalogue(0.2, 0.6)).unwrap();
    let conf = dir.path().join("tollgate.yaml");
    std::fs::write(
        &conf,
        format!(
            "store:\n  url: sqlite://{}/t.db\nupstreams:\n  u:\n    servers: [{{url: \"http://127.0.0.1:9/v1\"}}]\n{}",
            dir.path().display(),
            models(&prices)
        ),
    )
    .unwrap();
    let conf = conf.to_str().unwrap();
    let (ok, out, err) = tollgate(&["-c", conf, "pricing", "--json"]);
    assert!(ok, "{err}");
    let rows: Vec<Value> = serde_json::from_str(&out).unwrap();
    let row = |alias: &str| rows.iter().find(|r| r["alias"] == alias).unwrap().clone();
    let file = format!("file {} (2026-12-01)", prices.display());
    // From the catalogue, by exact name and by family (a dated name).
    assert_eq!(row("llama")["source"], file.as_str());
    assert_eq!(
        (
            row("llama")["input"].as_f64(),
            row("llama")["output"].as_f64()
        ),
        (Some(0.2), Some(0.6))
    );
    assert_eq!(row("dated")["priced_as"], "gpt-4o");
    assert_eq!(row("dated")["source"], file.as_str());
    assert_eq!(row("dated")["cached_input"].as_f64(), Some(1.0));
    // The config's entry wins over the catalogue's; the shipped table is last.
    assert_eq!(row("other")["source"], "config");
    assert_eq!(row("other")["input"].as_f64(), Some(1.0));
    assert_eq!(row("shipped")["source"], "shipped (2025-11-01)");
    assert_eq!(row("shipped")["priced_as"], "claude-sonnet-4-5");
    assert_eq!(row("shipped")["cache_write"].as_f64(), Some(3.75));
    let (ok, table, _) = tollgate(&["-c", conf, "pricing"]);
    assert!(
        ok && table.contains("list prices as of 2025-11-01"),
        "{table}"
    );
    assert!(
        table.contains("Catalogue: ") && table.contains("(dated 2026-12-01)"),
        "{table}"
    );

    // A catalogue with bad entries is refused, each entry named.
    std::fs::write(
        &prices,
        r#"{"prices": {"a": {"input": -1, "output": 2}, "b": {"input": 1}, "c": {"input": 1, "output": 1, "colour": "red"}}, "currency": "EUR"}"#,
    )
    .unwrap();
    let (ok, _, err) = tollgate(&["-t", "-c", conf]);
    assert!(!ok);
    for entry in [
        "prices.a: prices must be numbers",
        "prices.b: missing field `output`",
        "prices.c: unknown field `colour`",
        "currency: unknown field",
    ] {
        assert!(
            err.contains(&format!("pricing.file: {}: {entry}", prices.display())),
            "{entry} in:\n{err}"
        );
    }
    std::fs::remove_file(&prices).unwrap();
    let (ok, _, err) = tollgate(&["-t", "-c", conf]);
    assert!(!ok && err.contains("pricing.file: cannot read"), "{err}");
}

async fn cost(gw: &Gateway) -> String {
    let r = client()
        .post(gw.url("/v1/chat/completions"))
        .json(&json!({"model": "llama", "messages": [{"role": "user", "content": "hi"}]}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    r.headers()["x-tollgate-cost-usd"]
        .to_str()
        .unwrap()
        .to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_reads_the_catalogue_again_and_keeps_the_old_prices_when_it_is_bad() {
    let up = MockUpstream::start("u").await.unwrap();
    up.set_default(Reply::error(200, r#"{"id":"c","object":"chat.completion","created":0,"model":"local-llama","choices":[{"index":0,"message":{"role":"assistant","content":"hi"},"finish_reason":"stop"}],"usage":{"prompt_tokens":1000,"completion_tokens":1000,"total_tokens":2000}}"#));
    let dir = tempfile::tempdir().unwrap();
    let prices = dir.path().join("prices.json");
    std::fs::write(&prices, catalogue(0.2, 0.6)).unwrap();
    let gw = Gateway::start(&format!(
        "upstreams:\n  u:\n    servers: [{{url: \"{}\"}}]\n{}",
        up.url(),
        models(&prices)
    ));
    // 1,000 tokens in and out at $0.20 and $0.60 per million: 800 micro-USD.
    assert_eq!(cost(&gw).await, "0.000800");
    std::fs::write(&prices, catalogue(1.0, 3.0)).unwrap();
    let r = client()
        .post(gw.admin_url("/admin/reload"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(cost(&gw).await, "0.004000");
    // A bad catalogue fails the reload; the prices in force stay.
    std::fs::write(
        &prices,
        "{\"prices\": {\"local-llama\": {\"input\": \"cheap\", \"output\": 1}}}",
    )
    .unwrap();
    let r = client()
        .post(gw.admin_url("/admin/reload"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    let v: Value = r.json().await.unwrap();
    assert!(
        v["errors"][0]
            .as_str()
            .unwrap()
            .contains("prices.local-llama"),
        "{v}"
    );
    assert_eq!(cost(&gw).await, "0.004000");
}
