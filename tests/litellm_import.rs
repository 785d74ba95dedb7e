//! Moving from LiteLLM: `tollgate import-litellm` on a config in the shapes of LiteLLM's
//! documented examples (the output passes `-t` and routes each alias to the same
//! upstreams, tiers and fallbacks), and `tollgate import-litellm-keys` from a real
//! PostgreSQL holding LiteLLM's tables (the `sk-` strings clients hold keep working, with
//! LiteLLM's answers for blocked, expired and spent keys, and their spend).

// Helpers outside #[test] functions stop the test loudly on a failed step.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use common::{Gateway, Postgres, Redis};
use serde_json::{json, Value};
use std::process::Command;
use tollgate::demo::mock::{MockUpstream, Reply};

const ENV: &[(&str, &str)] = &[
    ("OPENAI_API_KEY", "sk-openai-test"),
    ("AZURE_API_KEY", "azure-test-key"),
    ("ANTHROPIC_API_KEY", "sk-ant-test"),
    ("LITELLM_MASTER_KEY", "litellm-master-key-0123456789"),
];

fn tollgate(args: &[&str]) -> (bool, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_tollgate"))
        .args(args)
        .envs(ENV.iter().copied())
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// A config like LiteLLM's proxy examples: two tiers of gpt-4o (OpenAI, then Azure),
/// Anthropic, and two vLLM servers weighted 1:3, with fallbacks and a Redis cache.
fn litellm_config(up: &[&MockUpstream; 5], redis: &str) -> String {
    let base = |i: usize| format!("http://{}", up[i].addr);
    format!(
        r#"model_list:
  - model_name: gpt-4o
    litellm_params:
      model: openai/gpt-4o
      api_base: {a}/v1
      api_key: os.environ/OPENAI_API_KEY
      order: 1
  - model_name: gpt-4o
    litellm_params:
      model: azure/gpt4o-prod
      api_base: {b}
      api_key: os.environ/AZURE_API_KEY
      api_version: "2024-06-01"
      order: 2
    model_info:
      base_model: azure/gpt-4o
  - model_name: claude-sonnet
    litellm_params:
      model: anthropic/claude-sonnet-4-5
      api_base: {c}
      api_key: os.environ/ANTHROPIC_API_KEY
  - model_name: llama3
    litellm_params:
      model: hosted_vllm/meta-llama/Llama-3.1-8B-Instruct
      api_base: {d}/v1
      rpm: 100
      weight: 1
  - model_name: llama3
    litellm_params:
      model: hosted_vllm/meta-llama/Llama-3.1-8B-Instruct
      api_base: {e}
      api_key: sk-literal-vllm-0001
      rpm: 300
      weight: 3
    model_info:
      max_input_tokens: 131072
  - model_name: titan
    litellm_params:
      model: bedrock/amazon.titan-text-express-v1
      aws_region_name: us-east-1
router_settings:
  routing_strategy: simple-shuffle
  num_retries: 4
  timeout: 30
  cooldown_time: 60
  fallbacks: [{{"gpt-4o": ["claude-sonnet"]}}, {{"claude-sonnet": ["llama3", "titan"]}}]
litellm_settings:
  drop_params: true
  success_callback: ["langfuse"]
  cache: true
  cache_params:
    type: redis
    url: {redis}
    ttl: 300
general_settings:
  master_key: os.environ/LITELLM_MASTER_KEY
"#,
        a = base(0),
        b = base(1),
        c = base(2),
        d = base(3),
        e = base(4),
    )
}

async fn chat(gw: &Gateway, model: &str, text: &str) -> reqwest::Response {
    common::client()
        .post(gw.url("/v1/chat/completions"))
        .json(&json!({"model": model, "messages": [{"role": "user", "content": text}]}))
        .send()
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_litellm_config_routes_each_alias_to_the_same_upstreams_tiers_and_fallbacks() {
    let mocks = [
        MockUpstream::start("openai").await.unwrap(),
        MockUpstream::start("azure").await.unwrap(),
        MockUpstream::start("anthropic").await.unwrap(),
        MockUpstream::start("vllm-a").await.unwrap(),
        MockUpstream::start("vllm-b").await.unwrap(),
    ];
    let [oa, az, an, va, vb] = &mocks;
    let redis = Redis::start();
    let dir = tempfile::tempdir().unwrap();
    let source = dir.path().join("litellm.yaml");
    std::fs::write(&source, litellm_config(&[oa, az, an, va, vb], &redis.url)).unwrap();
    let out = dir.path().join("tollgate.yaml");
    let (ok, _, warnings) = tollgate(&[
        "import-litellm",
        source.to_str().unwrap(),
        "-o",
        out.to_str().unwrap(),
    ]);
    assert!(ok, "{warnings}");
    // What has no equivalent is named with its path, and no secret is shown.
    for path in [
        "model_list[5].litellm_params.model: provider bedrock",
        "litellm_settings.drop_params",
        "litellm_settings.success_callback",
        "fallbacks.claude-sonnet: titan is not a model_name",
    ] {
        assert!(warnings.contains(path), "{path} missing from:\n{warnings}");
    }
    // A literal key is copied (with a warning), never printed.
    assert!(
        warnings.contains("model_list[4].litellm_params.api_key: a literal key was copied"),
        "{warnings}"
    );
    assert!(!warnings.contains("sk-literal-vllm-0001"));
    let (ok, checked, errors) = tollgate(&["-t", "-c", out.to_str().unwrap()]);
    assert!(ok && checked.contains("OK"), "{errors}");

    let yaml = std::fs::read_to_string(&out).unwrap();
    let mut config: serde_yaml::Value = serde_yaml::from_str(&yaml).unwrap();
    let ups = &config["upstreams"];
    let provider_of = |route: &serde_yaml::Value| {
        ups[route["upstream"].as_str().unwrap()]["provider"]
            .as_str()
            .unwrap()
            .to_string()
    };
    let gpt = &config["models"]["gpt-4o"]["routes"];
    assert_eq!(provider_of(&gpt[0]), "openai");
    assert_eq!(gpt[0].get("priority"), None, "order 1 is the first tier");
    assert_eq!(provider_of(&gpt[1]), "azure");
    assert_eq!(gpt[1]["priority"], 2);
    assert_eq!(
        gpt[1]["model"], "gpt-4o",
        "the base model is the one priced"
    );
    let llama = &config["models"]["llama3"];
    assert_eq!(llama["strategy"], "weighted");
    assert_eq!(llama["limits"]["rpm"], 400);
    assert_eq!(llama["routes"][1]["max_context"], 131072);
    assert_eq!(config["failover"]["max_attempts"], 5);
    assert_eq!(config["models"]["claude-sonnet"]["fallbacks"][0], "llama3");
    assert_eq!(config["admin"]["master_key"], "${LITELLM_MASTER_KEY}");

    // Run it, on the test's own listeners.
    config.as_mapping_mut().unwrap().remove("server");
    let body = serde_yaml::to_string(&config).unwrap();
    let gw = Gateway::start_with_env(&body, ENV);

    // Tier 1: OpenAI, with its key; the same question again is a cache hit.
    let r = chat(&gw, "gpt-4o", "first").await;
    assert_eq!(r.status(), 200);
    let seen = oa.last().unwrap();
    assert_eq!(seen.headers["authorization"], "Bearer sk-openai-test");
    assert_eq!(seen.path, "/v1/chat/completions");
    let r = chat(&gw, "gpt-4o", "first").await;
    assert_eq!(r.headers()["x-tollgate-cache"], "hit");
    assert_eq!(oa.hits(), 1);

    // OpenAI fails: tier 2, Azure's deployment URL with its api-key header.
    oa.set_default(Reply::error(500, r#"{"error":{"message":"boom"}}"#));
    let r = chat(&gw, "gpt-4o", "second").await;
    assert_eq!(r.status(), 200);
    assert_eq!((oa.hits(), az.hits()), (2, 1));
    let seen = az.last().unwrap();
    assert_eq!(
        seen.path,
        "/openai/deployments/gpt4o-prod/chat/completions?api-version=2024-06-01"
    );
    assert_eq!(seen.headers["api-key"], "azure-test-key");

    // Both tiers fail: the fallback alias, on Anthropic (translated), then llama3.
    az.set_default(Reply::error(500, r#"{"error":{"message":"boom"}}"#));
    let r = chat(&gw, "gpt-4o", "third").await;
    assert_eq!(r.status(), 200);
    let seen = an.last().unwrap();
    assert_eq!(seen.path, "/v1/messages");
    assert_eq!(seen.headers["x-api-key"], "sk-ant-test");
    an.set_default(Reply::error(
        529,
        r#"{"type":"error","error":{"type":"overloaded_error","message":"Overloaded"}}"#,
    ));
    let r = chat(&gw, "claude-sonnet", "fourth").await;
    assert_eq!(r.status(), 200);
    assert_eq!(va.hits() + vb.hits(), 1);

    // llama3's two servers share its tier 1:3, as LiteLLM's weights said.
    let before = (va.hits(), vb.hits());
    for i in 0..8 {
        let r = chat(&gw, "llama3", &format!("weighted {i}")).await;
        assert_eq!(r.status(), 200);
    }
    assert_eq!((va.hits() - before.0, vb.hits() - before.1), (2, 6));
    assert_eq!(
        vb.last().unwrap().headers["authorization"],
        "Bearer sk-literal-vllm-0001"
    );
    let sent: Value = serde_json::from_slice(&vb.last().unwrap().body).unwrap();
    assert_eq!(sent["model"], "meta-llama/Llama-3.1-8B-Instruct");
}

/// LiteLLM's two tables, with the columns the import reads and their types in LiteLLM's
/// schema (other columns left out).
const LITELLM_TABLES: &str = r#"
CREATE TABLE "LiteLLM_TeamTable" (
    "team_id" TEXT NOT NULL PRIMARY KEY,
    "team_alias" TEXT,
    "max_budget" DOUBLE PRECISION,
    "spend" DOUBLE PRECISION NOT NULL DEFAULT 0.0,
    "models" TEXT[],
    "max_parallel_requests" INTEGER,
    "tpm_limit" BIGINT,
    "rpm_limit" BIGINT,
    "budget_duration" TEXT,
    "budget_reset_at" TIMESTAMP(3),
    "blocked" BOOLEAN NOT NULL DEFAULT false
);
CREATE TABLE "LiteLLM_VerificationToken" (
    "token" TEXT NOT NULL PRIMARY KEY,
    "key_name" TEXT,
    "key_alias" TEXT,
    "spend" DOUBLE PRECISION NOT NULL DEFAULT 0.0,
    "expires" TIMESTAMP(3),
    "models" TEXT[],
    "team_id" TEXT,
    "max_parallel_requests" INTEGER,
    "blocked" BOOLEAN,
    "tpm_limit" BIGINT,
    "rpm_limit" BIGINT,
    "max_budget" DOUBLE PRECISION,
    "budget_duration" TEXT,
    "budget_reset_at" TIMESTAMP(3)
);
INSERT INTO "LiteLLM_TeamTable" (team_id, team_alias, max_budget, spend, models, budget_duration, budget_reset_at)
VALUES ('8d1c6b1e-0a51-4b7e-9a43-2f1c5e2d7a10', 'ml-research', 100.0, 12.5, ARRAY['gpt-4o'], '30d', now() + interval '10 days'),
       ('c2a7e4f0-5b3d-4e8a-b1f9-6d0e3a9c8b21', 'ops', NULL, 5.5, ARRAY[]::TEXT[], NULL, NULL);
INSERT INTO "LiteLLM_VerificationToken" (token, key_name, key_alias, spend, expires, models, team_id, blocked, rpm_limit, max_budget, budget_duration, budget_reset_at)
VALUES
 (encode(sha256('sk-alpha-0001'::bytea), 'hex'), 'sk-...0001', 'alpha', 1.25, NULL, ARRAY['gpt-4o'], '8d1c6b1e-0a51-4b7e-9a43-2f1c5e2d7a10', NULL, 60, 10.0, '1d', now() + interval '12 hours'),
 (encode(sha256('sk-blocked-0002'::bytea), 'hex'), 'sk-...0002', 'blocked one', 0.5, NULL, NULL, '8d1c6b1e-0a51-4b7e-9a43-2f1c5e2d7a10', true, NULL, NULL, NULL, NULL),
 (encode(sha256('sk-expired-0003'::bytea), 'hex'), 'sk-...0003', 'expired one', 0.0, now() - interval '1 day', NULL, 'c2a7e4f0-5b3d-4e8a-b1f9-6d0e3a9c8b21', false, NULL, NULL, NULL, NULL),
 (encode(sha256('sk-spent-0004'::bytea), 'hex'), 'sk-...0004', 'nearly spent', 4.999, NULL, NULL, 'c2a7e4f0-5b3d-4e8a-b1f9-6d0e3a9c8b21', false, NULL, 5.0, NULL, NULL),
 (encode(sha256('sk-plain-0005'::bytea), 'hex'), 'sk-...0005', NULL, 0.75, NULL, ARRAY[]::TEXT[], NULL, NULL, NULL, NULL, NULL, NULL);
"#;

const MASTER: &str = "tollgate-admin-master-key-0001";

async fn key_info(gw: &Gateway, key: &str) -> Value {
    common::get_json_as(gw.url("/v1/key/info"), key).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn litellm_keys_keep_working_with_their_teams_budgets_and_spend() {
    let pg = Postgres::start();
    pg.psql(LITELLM_TABLES);
    let upstream = MockUpstream::start("model").await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("tollgate.db");
    let conf = dir.path().join("tollgate.yaml");
    let body = format!(
        "store:\n  url: sqlite://{}\nadmin:\n  master_key: {MASTER}\nbudgets:\n  unpriced: allow\nupstreams:\n  up:\n    servers: [{{url: \"{}\"}}]\nmodels:\n  gpt-4o:\n    routes: [{{upstream: up}}]\npricing:\n  gpt-4o: {{input: 2.5, output: 10}}\n",
        db.display(),
        upstream.url()
    );
    std::fs::write(&conf, &body).unwrap();
    let conf = conf.to_str().unwrap();

    // A dry run lists what would come, and writes nothing.
    let (ok, out, err) = tollgate(&[
        "-c",
        conf,
        "import-litellm-keys",
        "--from",
        &pg.url,
        "--dry-run",
    ]);
    assert!(ok, "{err}");
    assert!(
        out.contains("teams (2):") && out.contains("keys (5):"),
        "{out}"
    );
    assert!(out.contains("blocked one  blocked") && out.contains("expired one  expired"));
    assert!(
        out.contains("ml-research  budget $100 monthly  spent $10.75"),
        "{out}"
    );
    assert!(!db.exists());
    assert!(!out.contains(&pg.url) && !err.contains("sk-alpha"));

    // Imported twice: the second run updates what the first wrote.
    for _ in 0..2 {
        let (ok, out, err) = tollgate(&["-c", conf, "import-litellm-keys", "--from", &pg.url]);
        assert!(ok, "{err}");
        assert!(
            out.contains("imported 2 team(s) and 5 key(s) from LiteLLM, with $18.75 of spend"),
            "{out}"
        );
    }

    let gw = Gateway::start(&body);
    let ask = |key: &'static str| {
        let gw = &gw;
        async move {
            common::client()
                .post(gw.url("/v1/chat/completions"))
                .bearer_auth(key)
                .json(&json!({"model": "gpt-4o", "max_tokens": 100, "messages": [{"role": "user", "content": "hi"}]}))
                .send()
                .await
                .unwrap()
                .status()
                .as_u16()
        }
    };
    // Spend so far carried over: the key's own and its team's (12.50 in LiteLLM).
    let info = key_info(&gw, "sk-alpha-0001").await;
    assert_eq!(info["name"], "alpha");
    assert_eq!(info["limits"]["rpm"], 60);
    assert_eq!(info["budgets"][0]["spend_usd"], 1.25, "{info}");
    assert_eq!(info["budgets"][0]["period"], "daily");
    assert_eq!(info["budgets"][1]["spend_usd"], 12.5, "{info}");

    // LiteLLM's answers: the live keys work, the blocked and expired ones are refused,
    // and the one at its budget is out of money.
    assert_eq!(ask("sk-alpha-0001").await, 200);
    assert_eq!(ask("sk-blocked-0002").await, 401);
    assert_eq!(ask("sk-expired-0003").await, 401);
    assert_eq!(ask("sk-spent-0004").await, 402);
    assert_eq!(ask("sk-plain-0005").await, 200);
    assert_eq!(ask("sk-never-issued").await, 401);
    assert_eq!(upstream.hits(), 2);

    // A client set up as LiteLLM's documentation says (the openai SDK, the proxy's root
    // as base URL, no /v1) works unchanged with its key.
    let script = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/python/sdk_litellm_client.py"
    );
    let root = gw.url("");
    let out = tokio::task::spawn_blocking(move || {
        Command::new(common::python())
            .args([script, &root, "sk-plain-0005", "gpt-4o"])
            .output()
            .expect("run python (see scripts/bootstrap)")
    })
    .await
    .unwrap();
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("litellm client ok"),
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(upstream.hits(), 4);
    assert_eq!(upstream.last().unwrap().path, "/v1/chat/completions");

    // One key row each (no duplicates from the second run), and the admin API's spend
    // per key is LiteLLM's plus what Tollgate served since.
    let keys = common::get_json_as(gw.admin_url("/admin/keys"), MASTER).await;
    assert_eq!(keys["total"], 5, "{keys}");
    let info = key_info(&gw, "sk-alpha-0001").await;
    let spent = info["budgets"][0]["spend_usd"].as_f64().unwrap();
    assert!(spent > 1.25 && spent < 1.26, "{info}");
}
