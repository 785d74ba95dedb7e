//! Keys, teams, budgets and spend, against the real binary and a real SQLite file: the
//! admin API, enforcement on the proxy path, spend and usage queries, restarts.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use common::*;
use serde_json::{json, Value};
use std::time::Duration;
use tollgate::demo::mock::{MockUpstream, Reply};

const MASTER: &str = "test-master-key-0123";

/// Upstream `u` behind alias `m` (and `other`), a master key, and `extra` config.
fn config(url: &str, extra: &str) -> String {
    format!(
        "admin:\n  master_key: {MASTER}\nupstreams:\n  u:\n    servers: [{{url: \"{url}\"}}]\nmodels:\n  m:\n    routes: [{{upstream: u, model: up-model}}]\n  other:\n    routes: [{{upstream: u}}]\n{extra}"
    )
}

struct Admin<'a> {
    gw: &'a Gateway,
    c: reqwest::Client,
}

impl Admin<'_> {
    fn new(gw: &Gateway) -> Admin<'_> {
        Admin { gw, c: client() }
    }

    async fn call(&self, method: &str, path: &str, body: Option<Value>) -> (u16, Value) {
        let m = reqwest::Method::from_bytes(method.as_bytes()).unwrap();
        let mut req = self
            .c
            .request(m, self.gw.admin_url(path))
            .bearer_auth(MASTER);
        if let Some(b) = body {
            req = req.json(&b);
        }
        let r = req.send().await.unwrap();
        let status = r.status().as_u16();
        let text = r.text().await.unwrap();
        (
            status,
            serde_json::from_str(&text).unwrap_or(Value::String(text)),
        )
    }

    async fn create_key(&self, body: Value) -> (String, String) {
        let (status, v) = self.call("POST", "/admin/keys", Some(body)).await;
        assert_eq!(status, 201, "{v}");
        (
            v["id"].as_str().unwrap().to_string(),
            v["key"].as_str().unwrap().to_string(),
        )
    }
}

async fn chat_with(gw: &Gateway, key: &str, body: &Value) -> (u16, Value) {
    let r = client()
        .post(gw.url("/v1/chat/completions"))
        .bearer_auth(key)
        .json(body)
        .send()
        .await
        .unwrap();
    let status = r.status().as_u16();
    let text = r.text().await.unwrap();
    (
        status,
        serde_json::from_str(&text).unwrap_or(Value::String(text)),
    )
}

/// The key's budget spend in micro-dollars once it reaches `expected` (an answer's cost
/// is settled just after its last byte), or what it is after 2 s.
async fn settled_spend(gw: &Gateway, key: &str, expected: i64) -> i64 {
    let mut spent = 0;
    for _ in 0..200 {
        let info: Value = get_as(gw, "/v1/key/info", key).await;
        spent = (info["budgets"][0]["spend_usd"].as_f64().unwrap() * 1e6).round() as i64;
        if spent == expected {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    spent
}

/// A GET on the proxy listener with a client key, as JSON.
async fn get_as(gw: &Gateway, path: &str, key: &str) -> Value {
    client()
        .get(gw.url(path))
        .bearer_auth(key)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap()
}

fn msg(model: &str) -> Value {
    json!({"model": model, "messages": [{"role": "user", "content": "hello"}]})
}

#[tokio::test]
async fn keys_are_created_used_rotated_blocked_expired_and_deleted() {
    let up = MockUpstream::start("up").await.unwrap();
    let gw = Gateway::start(&config(&up.url(), ""));
    let admin = Admin::new(&gw);

    // The API needs the master key.
    let r = client()
        .get(gw.admin_url("/admin/keys"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    let r = client()
        .get(gw.admin_url("/admin/keys"))
        .bearer_auth("wrong")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    // Field errors name the field.
    let (s, v) = admin
        .call(
            "POST",
            "/admin/keys",
            Some(json!({"name": "x", "budget": {"max_usd": 5, "period": "hourly"}})),
        )
        .await;
    assert_eq!(s, 400);
    assert_eq!(v["error"]["param"], "budget.period");
    assert_eq!(
        v["error"]["message"],
        "budget.period: expected daily, weekly, monthly or total"
    );
    let (s, v) = admin
        .call("POST", "/admin/keys", Some(json!({"team": "nope"})))
        .await;
    assert_eq!((s, v["error"]["param"].as_str()), (400, Some("name")));
    let (s, v) = admin
        .call(
            "POST",
            "/admin/keys",
            Some(json!({"name": "x", "colour": 1})),
        )
        .await;
    assert_eq!((s, v["error"]["param"].as_str()), (400, Some("colour")));

    let (id, secret) = admin
        .create_key(json!({"name": "ci", "models": ["m"], "metadata": {"owner": "ops"}}))
        .await;
    assert!(secret.starts_with(&format!("tg-{id}-")), "{secret}");
    assert_eq!(chat_with(&gw, &secret, &msg("m")).await.0, 200);
    // The upstream never sees the client's key.
    let got = up.received();
    let last = got.last().unwrap();
    assert!(!format!("{:?}", last.headers).contains(&secret));
    // The allowlist: refused before any upstream work.
    let hits = up.hits();
    let (s, v) = chat_with(&gw, &secret, &msg("other")).await;
    assert_eq!(s, 403);
    assert_eq!(v["error"]["code"], "model_not_allowed");
    assert_eq!(up.hits(), hits);
    // /v1/models lists only what the key may call.
    let models: Value = get_as(&gw, "/v1/models", &secret).await;
    let ids: Vec<&str> = models["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, ["m"]);

    // Reads never show the secret or its digest.
    let digest = {
        use sha2::Digest;
        let d = sha2::Sha256::digest(secret.as_bytes());
        d.iter().map(|b| format!("{b:02x}")).collect::<String>()
    };
    let (_, list) = admin.call("GET", "/admin/keys", None).await;
    let (_, one) = admin.call("GET", &format!("/admin/keys/{id}"), None).await;
    for text in [list.to_string(), one.to_string()] {
        assert!(
            !text.contains(&secret[id.len() + 4..]) && !text.contains(&digest),
            "{text}"
        );
    }
    assert_eq!(one["name"], "ci");
    assert_eq!(one["metadata"]["owner"], "ops");

    // Rotation without grace: the old secret is refused at once, saying why.
    let (s, v) = admin
        .call("POST", &format!("/admin/keys/{id}/rotate"), None)
        .await;
    assert_eq!(s, 200);
    let secret2 = v["key"].as_str().unwrap().to_string();
    let (s, v) = chat_with(&gw, &secret, &msg("m")).await;
    assert_eq!(s, 401);
    assert_eq!(v["error"]["code"], "invalid_api_key");
    assert!(
        v["error"]["message"].as_str().unwrap().contains("rotated"),
        "{v}"
    );
    assert_eq!(chat_with(&gw, &secret2, &msg("m")).await.0, 200);
    // With a grace period both work.
    let (_, v) = admin
        .call(
            "POST",
            &format!("/admin/keys/{id}/rotate"),
            Some(json!({"grace_period": "1h"})),
        )
        .await;
    let secret3 = v["key"].as_str().unwrap().to_string();
    assert_eq!(chat_with(&gw, &secret2, &msg("m")).await.0, 200);
    assert_eq!(chat_with(&gw, &secret3, &msg("m")).await.0, 200);

    // Block, unblock, expire, delete: each refusal says which.
    let path = format!("/admin/keys/{id}");
    let reason = |v: &Value| {
        v["error"]["message"]
            .as_str()
            .unwrap_or_default()
            .to_string()
    };
    let (s, v) = admin
        .call("PATCH", &path, Some(json!({"blocked": true})))
        .await;
    assert_eq!((s, &v["blocked"]), (200, &json!(true)), "{v}");
    let (s, v) = chat_with(&gw, &secret3, &msg("m")).await;
    assert_eq!((s, reason(&v).contains("blocked")), (401, true), "{s} {v}");
    admin
        .call("PATCH", &path, Some(json!({"blocked": false})))
        .await;
    assert_eq!(chat_with(&gw, &secret3, &msg("m")).await.0, 200);
    let (s, _) = admin
        .call(
            "PATCH",
            &path,
            Some(json!({"expires_at": "2020-01-01T00:00:00Z"})),
        )
        .await;
    assert_eq!(s, 200);
    let (s, v) = chat_with(&gw, &secret3, &msg("m")).await;
    assert_eq!((s, reason(&v).contains("expired")), (401, true), "{v}");
    admin
        .call("PATCH", &path, Some(json!({"expires_in": "30d"})))
        .await;
    assert_eq!(chat_with(&gw, &secret3, &msg("m")).await.0, 200);
    let (s, _) = admin.call("DELETE", &path, None).await;
    assert_eq!(s, 200);
    let (s, v) = chat_with(&gw, &secret3, &msg("m")).await;
    assert_eq!((s, reason(&v).contains("deleted")), (401, true), "{v}");
    assert_eq!(admin.call("GET", &path, None).await.0, 404);
    // Deleting the last key does not open the gateway.
    assert_eq!(send_chat(&gw, "m", false).await.status(), 401);
    // A key that never existed.
    let (s, v) = chat_with(&gw, "tg-000000000000-nope", &msg("m")).await;
    assert_eq!(
        (s, v["error"]["code"].as_str()),
        (401, Some("invalid_api_key"))
    );

    // Every change is audited, without secrets.
    let (_, audit) = admin.call("GET", "/admin/audit", None).await;
    let actions: Vec<&str> = audit["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a["action"].as_str().unwrap())
        .collect();
    for a in ["key.create", "key.rotate", "key.update", "key.delete"] {
        assert!(actions.contains(&a), "{actions:?}");
    }
    let text = audit.to_string();
    for s in [&secret, &secret2, &secret3] {
        assert!(!text.contains(&s[id.len() + 4..]));
    }
    assert!(!text.contains(&digest));
    assert!(!gw.logs().contains(&secret3[id.len() + 4..]));
}

#[tokio::test]
async fn without_a_master_key_the_keys_api_is_off_and_config_keys_still_work() {
    let up = MockUpstream::start("up").await.unwrap();
    let gw = Gateway::start(&format!(
        "keys:\n  - {{name: cfg, key: cfg-secret-1, models: [m]}}\n{}",
        single(&up.url())
    ));
    let r = client()
        .get(gw.admin_url("/admin/keys"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 404);
    assert!(gw.logs().contains("admin.master_key is not set"));
    assert_eq!(chat_with(&gw, "cfg-secret-1", &msg("m")).await.0, 200);
    assert_eq!(chat_with(&gw, "cfg-secret-2", &msg("m")).await.0, 401);
}

#[tokio::test]
async fn config_keys_are_listed_read_only_and_teams_bound_their_keys() {
    let up = MockUpstream::start("up").await.unwrap();
    let gw = Gateway::start(&config(
        &up.url(),
        "keys:\n  - {name: cfg, key: cfg-secret-1}\n",
    ));
    let admin = Admin::new(&gw);
    let (_, list) = admin.call("GET", "/admin/keys", None).await;
    let cfg = &list["data"][0];
    assert_eq!(
        (cfg["source"].as_str(), cfg["read_only"].as_bool()),
        (Some("config"), Some(true))
    );
    let (s, _) = admin
        .call(
            "PATCH",
            "/admin/keys/config:cfg",
            Some(json!({"blocked": true})),
        )
        .await;
    assert_eq!(s, 409);

    // A team allows only `m` and 3 requests per minute (a refused request counts: request
    // limits are taken before the body is read); its keys pass both lists.
    let (s, team) = admin
        .call(
            "POST",
            "/admin/teams",
            Some(json!({"name": "research", "models": ["m"], "limits": {"rpm": 3}})),
        )
        .await;
    assert_eq!(s, 201, "{team}");
    let (s, v) = admin
        .call("POST", "/admin/teams", Some(json!({"name": "research"})))
        .await;
    assert_eq!((s, v["error"]["param"].as_str()), (400, Some("name")));
    let (a_id, a) = admin
        .create_key(json!({"name": "a", "team": "research"}))
        .await;
    let (_, b) = admin
        .create_key(json!({"name": "b", "team": team["id"]}))
        .await;
    assert_eq!(chat_with(&gw, &a, &msg("other")).await.0, 403);
    let (s, v) = chat_with(&gw, &a, &msg("m")).await;
    assert_eq!(s, 200, "{v}");
    assert_eq!(chat_with(&gw, &b, &msg("m")).await.0, 200);
    let (s, v) = chat_with(&gw, &b, &msg("m")).await;
    assert_eq!(s, 429, "{v}");
    assert!(
        v["error"]["message"].as_str().unwrap().contains("team"),
        "{v}"
    );
    // Keys filter by team; a team with keys is not deleted.
    let (_, list) = admin.call("GET", "/admin/keys?team=research", None).await;
    assert_eq!(list["total"], 2);
    let team_path = format!("/admin/teams/{}", team["id"].as_str().unwrap());
    assert_eq!(admin.call("DELETE", &team_path, None).await.0, 409);
    // /v1/key/info shows the key's own view.
    let info: Value = get_as(&gw, "/v1/key/info", &a).await;
    assert_eq!(
        (info["id"].as_str(), info["name"].as_str()),
        (Some(a_id.as_str()), Some("a"))
    );
    assert_eq!(info["team"]["name"], "research");
    assert!(!info.to_string().contains(&a[a_id.len() + 4..]));
}

/// Prices of 1 USD per million tokens: one micro-dollar per token.
const PRICING: &str = "pricing:\n  up-model: {input: 1.0, output: 1.0}\n";

fn reply_with_usage(prompt: u64, completion: u64) -> Reply {
    Reply::Status {
        status: 200,
        headers: vec![("content-type".into(), "application/json".into())],
        body: json!({"id": "x", "object": "chat.completion", "choices": [{"index": 0, "message": {"role": "assistant", "content": "ok"}, "finish_reason": "stop"}],
                     "usage": {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}})
        .to_string(),
    }
}

#[tokio::test]
async fn a_budget_refuses_with_402_naming_scope_and_reset_time() {
    let up = MockUpstream::start("up").await.unwrap();
    up.set_default(reply_with_usage(20, 10));
    let gw = Gateway::start(&config(&up.url(), PRICING));
    let admin = Admin::new(&gw);
    let body =
        json!({"model": "m", "max_tokens": 10, "messages": [{"role": "user", "content": "hello"}]});
    let reserve = serde_json::to_vec(&body).unwrap().len().div_ceil(4) as i64 + 10;
    // Room for three answers of 30 micro-dollars, not a fourth reservation.
    let max_micro = 90 + reserve - 1;
    let (id, key) = admin
        .create_key(json!({"name": "b", "budget": {"max_usd": max_micro as f64 / 1e6, "period": "monthly"}}))
        .await;
    for _ in 0..3 {
        assert_eq!(chat_with(&gw, &key, &body).await.0, 200);
    }
    let hits = up.hits();
    let (s, v) = chat_with(&gw, &key, &body).await;
    assert_eq!(s, 402, "{v}");
    assert_eq!(v["error"]["type"], "insufficient_quota");
    assert_eq!(v["error"]["code"], "budget_exceeded");
    assert_eq!(v["error"]["scope"], "key");
    assert_eq!(up.hits(), hits);
    let now = chrono::Utc::now();
    let next_month = if now.format("%m").to_string() == "12" {
        format!(
            "{}-01-01T00:00:00Z",
            now.format("%Y").to_string().parse::<i32>().unwrap() + 1
        )
    } else {
        let m: u32 = now.format("%m").to_string().parse().unwrap();
        format!("{}-{:02}-01T00:00:00Z", now.format("%Y"), m + 1)
    };
    assert_eq!(v["error"]["resets_at"], next_month.as_str());
    assert!(v["error"]["message"]
        .as_str()
        .unwrap()
        .contains(&next_month));
    // The key's own view agrees: 90 micro-dollars spent.
    let info: Value = get_as(&gw, "/v1/key/info", &key).await;
    assert_eq!(settled_spend(&gw, &key, 90).await, 90);
    assert_eq!(info["budgets"][0]["resets_at"], next_month.as_str());
    // reset_spend makes room again.
    let (s, _) = admin
        .call("POST", &format!("/admin/keys/{id}/reset_spend"), None)
        .await;
    assert_eq!(s, 200);
    assert_eq!(chat_with(&gw, &key, &body).await.0, 200);
    let m = scrape(&gw).await;
    assert!(
        m.contains("tollgate_budget_refusals_total{scope=\"key\"} 1"),
        "{m}"
    );
    // A track budget never refuses.
    let (_, tracked) = admin
        .create_key(json!({"name": "t", "budget": {"max_usd": 0.000001, "period": "daily", "mode": "track"}}))
        .await;
    for _ in 0..3 {
        assert_eq!(chat_with(&gw, &tracked, &body).await.0, 200);
    }
}

/// A key whose budget holds the input of `body` plus `output` tokens (1 micro-USD each).
async fn key_with_room(admin: &Admin<'_>, body: &Value, output: i64) -> String {
    let input = serde_json::to_vec(body).unwrap().len().div_ceil(4) as i64;
    let max_micro = input + output;
    admin
        .create_key(json!({"name": format!("room-{output}-{}", rand_suffix()), "budget": {"max_usd": max_micro as f64 / 1e6, "period": "total"}}))
        .await
        .1
}

fn rand_suffix() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos() as u64
}

#[tokio::test]
async fn a_budget_reservation_counts_every_choice_of_n_and_refuses_n_over_the_cap() {
    let up = MockUpstream::start("up").await.unwrap();
    up.set_default(reply_with_usage(5, 1));
    let gw = Gateway::start(&config(&up.url(), PRICING));
    let admin = Admin::new(&gw);
    let with_n = |n: u64| json!({"model": "m", "max_tokens": 20, "n": n, "messages": [{"role": "user", "content": "hello"}]});
    // Room for 4 choices of 20 tokens: one choice fits, eight do not.
    let key = key_with_room(&admin, &with_n(8), 80).await;
    let hits = up.hits();
    let (s, v) = chat_with(&gw, &key, &with_n(8)).await;
    assert_eq!(s, 402, "{v}");
    assert_eq!(v["error"]["code"], "budget_exceeded");
    assert_eq!(up.hits(), hits, "a refused reservation reaches no upstream");
    let (s, v) = chat_with(&gw, &key, &with_n(1)).await;
    assert_eq!(s, 200, "{v}");
    // More choices than budgets.max_n (16) is a client error, budget or not.
    let hits = up.hits();
    let (_, big) = admin
        .create_key(json!({"name": "big", "budget": {"max_usd": 100.0, "period": "total"}}))
        .await;
    let (s, v) = chat_with(&gw, &big, &with_n(128)).await;
    assert_eq!(s, 400, "{v}");
    assert!(
        v["error"]["message"]
            .as_str()
            .unwrap()
            .contains("budgets.max_n"),
        "{v}"
    );
    assert_eq!(chat_with(&gw, &big, &with_n(16)).await.0, 200);
    assert_eq!(up.hits(), hits + 1);
}

#[tokio::test]
async fn a_budget_reservation_trusts_only_the_endpoints_own_nonzero_budget_field() {
    let up = MockUpstream::start("up").await.unwrap();
    up.set_default(reply_with_usage(5, 1));
    let gw = Gateway::start(&config(&up.url(), PRICING));
    let admin = Admin::new(&gw);
    let hello = json!([{"role": "user", "content": "hello"}]);
    // max_tokens 0 would reserve no output.
    let zero = json!({"model": "m", "max_tokens": 0, "messages": hello});
    let key = key_with_room(&admin, &zero, 100).await;
    let hits = up.hits();
    let (s, v) = chat_with(&gw, &key, &zero).await;
    assert_eq!(s, 400, "{v}");
    assert!(v["error"]["message"]
        .as_str()
        .unwrap()
        .contains("max_tokens must be at least 1"));
    // max_output_tokens is not a chat field: the default 4096 is reserved, which the
    // budget cannot hold.
    let foreign = json!({"model": "m", "max_output_tokens": 5, "messages": hello});
    let key = key_with_room(&admin, &foreign, 100).await;
    assert_eq!(chat_with(&gw, &key, &foreign).await.0, 402);
    // Both chat fields: the larger is reserved.
    let both =
        json!({"model": "m", "max_completion_tokens": 10, "max_tokens": 500, "messages": hello});
    let key = key_with_room(&admin, &both, 100).await;
    assert_eq!(chat_with(&gw, &key, &both).await.0, 402);
    assert_eq!(up.hits(), hits);
    let fits =
        json!({"model": "m", "max_completion_tokens": 10, "max_tokens": 50, "messages": hello});
    let key = key_with_room(&admin, &fits, 100).await;
    assert_eq!(chat_with(&gw, &key, &fits).await.0, 200);
}

#[tokio::test]
async fn concurrent_requests_cannot_overspend_a_budget() {
    let up = MockUpstream::start("up").await.unwrap();
    up.set_default(Reply::Delay(
        Duration::from_millis(400),
        Box::new(reply_with_usage(20, 100)),
    ));
    let gw = Gateway::start(&config(&up.url(), PRICING));
    let admin = Admin::new(&gw);
    let body = json!({"model": "m", "max_tokens": 100, "messages": [{"role": "user", "content": "hello"}]});
    let reserve = serde_json::to_vec(&body).unwrap().len().div_ceil(4) as i64 + 100;
    let max_micro = 10 * reserve + reserve / 2;
    let (_, key) = admin
        .create_key(
            json!({"name": "c", "budget": {"max_usd": max_micro as f64 / 1e6, "period": "total"}}),
        )
        .await;
    let tasks: Vec<_> = (0..50)
        .map(|_| {
            let (url, key, body) = (gw.url("/v1/chat/completions"), key.clone(), body.clone());
            tokio::spawn(async move {
                client()
                    .post(url)
                    .bearer_auth(key)
                    .json(&body)
                    .send()
                    .await
                    .unwrap()
                    .status()
                    .as_u16()
            })
        })
        .collect();
    let mut statuses = Vec::new();
    for t in tasks {
        statuses.push(t.await.unwrap());
    }
    let admitted = statuses.iter().filter(|s| **s == 200).count();
    let refused = statuses.iter().filter(|s| **s == 402).count();
    // The documented bound: reservations that fit, and no more.
    assert!(admitted <= 10, "{admitted} admitted: {statuses:?}");
    assert!(admitted >= 1);
    assert_eq!(admitted + refused, 50, "{statuses:?}");
    assert_eq!(up.hits(), admitted);
    let spent = settled_spend(&gw, &key, admitted as i64 * 120).await;
    assert_eq!(spent, admitted as i64 * 120);
    assert!(spent <= max_micro);
}

fn sse_with_usage() -> Reply {
    let events = [
        r#"data: {"id":"s","object":"chat.completion.chunk","choices":[{"index":0,"delta":{"content":"hi"},"finish_reason":null}]}"#.to_string(),
        r#"data: {"id":"s","object":"chat.completion.chunk","choices":[],"usage":{"prompt_tokens":1000,"completion_tokens":200,"total_tokens":1200,"prompt_tokens_details":{"cached_tokens":400}}}"#.to_string(),
        "data: [DONE]".to_string(),
    ];
    Reply::Stream {
        events: events.iter().map(|e| format!("{e}\n\n")).collect(),
        gap: Duration::from_millis(5),
        cut: false,
    }
}

#[tokio::test]
async fn spend_and_usage_match_the_requests_sent() {
    let up = MockUpstream::start("up").await.unwrap();
    // 1000 input (400 cached), 200 output: 600 x 2 + 400 x 1 + 200 x 4 = 2400 micro-USD.
    let json_reply = Reply::Status {
        status: 200,
        headers: vec![("content-type".into(), "application/json".into())],
        body: json!({"choices": [], "usage": {"prompt_tokens": 1000, "completion_tokens": 200, "prompt_tokens_details": {"cached_tokens": 400}}}).to_string(),
    };
    up.push([json_reply.clone(), sse_with_usage(), json_reply]);
    let dir = tempfile::tempdir().unwrap();
    let gw = Gateway::start(&config(
        &up.url(),
        &format!(
            "pricing:\n  up-model: {{input: 2.0, cached_input: 1.0, output: 4.0}}\nstore:\n  url: sqlite://{}/t.db\n  flush_interval: 100ms\n",
            dir.path().display()
        ),
    ));
    let admin = Admin::new(&gw);
    let (s, team) = admin
        .call("POST", "/admin/teams", Some(json!({"name": "fin"})))
        .await;
    assert_eq!(s, 201, "{team}");
    let (id, key) = admin
        .create_key(json!({"name": "spender", "team": "fin"}))
        .await;
    assert_eq!(chat_with(&gw, &key, &msg("m")).await.0, 200);
    let r = client()
        .post(gw.url("/v1/chat/completions"))
        .bearer_auth(&key)
        .json(&json!({"model": "m", "stream": true, "messages": [{"role": "user", "content": "hello"}]}))
        .send()
        .await
        .unwrap();
    assert!(r.text().await.unwrap().contains("[DONE]"));
    assert_eq!(chat_with(&gw, &key, &msg("m")).await.0, 200);

    let mut rows = Value::Null;
    let mut found = false;
    for _ in 0..100 {
        rows = admin
            .call("GET", &format!("/admin/usage?key={id}"), None)
            .await
            .1;
        if rows["data"].as_array().is_some_and(|d| d.len() == 3) {
            found = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(found, "{rows}");
    for row in rows["data"].as_array().unwrap() {
        assert_eq!(row["input_tokens"], 1000);
        assert_eq!(row["output_tokens"], 200);
        assert_eq!(row["cached_tokens"], 400);
        assert_eq!(row["cost_micro_usd"], 2400);
        assert_eq!(row["key_name"], "spender");
        assert_eq!(row["team_id"], team["id"]);
        assert_eq!(row["upstream_model"], "up-model");
    }
    let streams = rows["data"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|r| r["stream"] == true)
        .count();
    assert_eq!(streams, 1);

    let (_, by_key) = admin.call("GET", "/admin/spend?group_by=key", None).await;
    let row = by_key["data"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["key_id"] == id.as_str())
        .unwrap()
        .clone();
    assert_eq!(row["key_name"], "spender");
    assert_eq!(row["requests"], 3);
    assert_eq!(row["spend_micro_usd"], 7200);
    assert_eq!(row["input_tokens"], 3000);
    assert_eq!(row["cached_tokens"], 1200);
    let (_, by_team) = admin.call("GET", "/admin/spend?group_by=team", None).await;
    assert_eq!(by_team["data"][0]["team_name"], "fin");
    assert_eq!(by_team["data"][0]["spend_micro_usd"], 7200);
    let today = chrono::Utc::now().format("%Y-%m-%d").to_string();
    let (_, by_day) = admin
        .call(
            "GET",
            &format!("/admin/spend?group_by=day&from={today}&to={today}"),
            None,
        )
        .await;
    assert_eq!(by_day["data"][0]["day"], today.as_str());
    assert_eq!(by_day["data"][0]["spend_micro_usd"], 7200);
    let (_, before) = admin
        .call("GET", "/admin/spend?group_by=model&to=2020-01-01", None)
        .await;
    assert_eq!(before["data"].as_array().unwrap().len(), 0);
    let (s, v) = admin
        .call("GET", "/admin/spend?group_by=colour", None)
        .await;
    assert_eq!((s, v["error"]["param"].as_str()), (400, Some("group_by")));
    let csv = client()
        .get(gw.admin_url("/admin/spend?group_by=model&format=csv"))
        .bearer_auth(MASTER)
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert_eq!(
        csv,
        "model,requests,input_tokens,output_tokens,cached_tokens,spend_micro_usd,spend_usd\nm,3,3000,600,1200,7200,0.0072\n"
    );
    // Metrics take the same cost, and the cached tokens.
    let m = scrape(&gw).await;
    assert!(
        m.contains("tollgate_cost_usd_total{model=\"m\",upstream=\"u\"} 0.0072"),
        "{m}"
    );
    assert!(
        m.contains("type=\"cached_input\",upstream=\"u\"} 1200"),
        "{m}"
    );
}

/// A config with its database at `db`, so a second process opens the same file.
fn persistent(url: &str, db: &std::path::Path, flush: &str) -> String {
    format!(
        "store:\n  url: sqlite://{}\n  flush_interval: {flush}\n{}",
        db.display(),
        config(url, PRICING)
    )
}

#[tokio::test]
async fn a_restart_keeps_keys_and_spend_and_kill_9_loses_at_most_one_flush_interval() {
    let up = MockUpstream::start("up").await.unwrap();
    up.set_default(reply_with_usage(20, 10));
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("state/tollgate.db");
    let mut gw = Gateway::start(&persistent(&up.url(), &db, "1h"));
    let (id, key) = Admin::new(&gw)
        .create_key(json!({"name": "p", "budget": {"max_usd": 1.0, "period": "total"}}))
        .await;
    for _ in 0..4 {
        assert_eq!(chat_with(&gw, &key, &msg("m")).await.0, 200);
    }
    // A graceful stop writes what is queued, even with an hour-long interval.
    assert!(gw.terminate().success());
    drop(gw);
    let gw = Gateway::start(&persistent(&up.url(), &db, "200ms"));
    assert_eq!(chat_with(&gw, &key, &msg("m")).await.0, 200);
    assert_eq!(settled_spend(&gw, &key, 150).await, 150);
    let usage = |gw: &Gateway| {
        let url = gw.admin_url(&format!("/admin/usage?key={id}"));
        async move {
            let v: Value = client()
                .get(url)
                .bearer_auth(MASTER)
                .send()
                .await
                .unwrap()
                .json()
                .await
                .unwrap();
            v["data"].as_array().unwrap().len()
        }
    };
    // Wait for a flush, then send three more and kill -9 at once.
    let flushed = eventually_async(Duration::from_secs(2), || async { usage(&gw).await == 5 });
    assert!(flushed.await);
    for _ in 0..3 {
        assert_eq!(chat_with(&gw, &key, &msg("m")).await.0, 200);
    }
    drop(gw); // SIGKILL
    let gw = Gateway::start(&persistent(&up.url(), &db, "200ms"));
    let kept = usage(&gw).await;
    // What was written stays; at most the last interval's three rows are lost.
    assert!((5..=8).contains(&kept), "{kept} rows");
    assert_eq!(chat_with(&gw, &key, &msg("m")).await.0, 200);
}

#[tokio::test]
async fn a_locked_database_does_not_stop_traffic_and_overflow_is_counted() {
    use sqlx::Connection;
    let up = MockUpstream::start("up").await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("t.db");
    let gw = Gateway::start(&format!(
        "store:\n  url: sqlite://{}\n  flush_interval: 100ms\n  queue_size: 5\n{}",
        db.display(),
        config(&up.url(), "")
    ));
    let (id, key) = Admin::new(&gw).create_key(json!({"name": "l"})).await;
    // Another process holds the write lock: the gateway's writes fail (busy).
    let mut other = sqlx::SqliteConnection::connect(&format!("sqlite://{}", db.display()))
        .await
        .unwrap();
    sqlx::query("BEGIN EXCLUSIVE")
        .execute(&mut other)
        .await
        .unwrap();
    let started = std::time::Instant::now();
    for _ in 0..8 {
        assert_eq!(chat_with(&gw, &key, &msg("m")).await.0, 200);
    }
    // Requests never waited on the database (its busy timeout is 5 s).
    assert!(
        started.elapsed() < Duration::from_secs(4),
        "{:?}",
        started.elapsed()
    );
    let dropped = || async {
        scrape(&gw)
            .await
            .contains("tollgate_usage_rows_total{result=\"dropped\"} 3")
    };
    let dropped = eventually_async(Duration::from_secs(10), dropped).await;
    assert!(dropped, "{}", scrape(&gw).await);
    assert!(gw.logs().contains("usage rows dropped"));
    sqlx::query("ROLLBACK").execute(&mut other).await.unwrap();
    drop(other);
    // The five queued rows are written once the lock is gone.
    let mut written = 0;
    for _ in 0..300 {
        let v: Value = client()
            .get(gw.admin_url(&format!("/admin/usage?key={id}")))
            .bearer_auth(MASTER)
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        written = v["data"].as_array().map_or(0, Vec::len);
        if written == 5 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(written, 5);
}

#[tokio::test]
async fn budget_alerts_reach_a_webhook() {
    let up = MockUpstream::start("up").await.unwrap();
    up.set_default(reply_with_usage(20, 10));
    let hook = MockUpstream::start("hook").await.unwrap();
    hook.set_default(Reply::error(200, "{}"));
    let gw = Gateway::start(&config(
        &up.url(),
        &format!(
            "{PRICING}alerts:\n  webhook:\n    url: {}/alerts\n    headers: {{authorization: Bearer hook-secret-9}}\n",
            hook.url().trim_end_matches("/v1")
        ),
    ));
    // 30 micro-dollars per answer against 100: 80% is crossed on the third.
    let (_, key) = Admin::new(&gw)
        .create_key(json!({"name": "w", "budget": {"max_usd": 0.0001, "period": "daily", "alert_at": [0.5, 0.8]}}))
        .await;
    let body =
        json!({"model": "m", "max_tokens": 10, "messages": [{"role": "user", "content": "hello"}]});
    for _ in 0..3 {
        assert_eq!(chat_with(&gw, &key, &body).await.0, 200);
    }
    assert!(
        eventually(Duration::from_secs(5), || hook.hits() == 2).await,
        "{} alerts",
        hook.hits()
    );
    let got = hook.received();
    let first: Value = serde_json::from_slice(&got[0].body).unwrap();
    assert_eq!(first["event"], "budget_threshold");
    assert_eq!(first["fraction"], 0.5);
    assert_eq!(first["name"], "w");
    assert_eq!(got[0].headers["authorization"], "Bearer hook-secret-9");
    let second: Value = serde_json::from_slice(&got[1].body).unwrap();
    assert_eq!(second["fraction"], 0.8);
    // Refusals: one alert per period, however many requests are refused.
    for _ in 0..3 {
        assert_eq!(chat_with(&gw, &key, &body).await.0, 402);
    }
    assert!(eventually(Duration::from_secs(5), || hook.hits() == 3).await);
    let refused: Value = serde_json::from_slice(&hook.received()[2].body).unwrap();
    assert_eq!(refused["event"], "budget_exceeded");
    assert_eq!(refused["scope"], "key");
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(hook.hits(), 3);
    assert!(!gw.logs().contains("hook-secret-9"));
}

fn cli(gw: &Gateway, args: &[&str]) -> (bool, String, String) {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_tollgate"))
        .args(args)
        .args(["--admin", &format!("http://{}", gw.admin)])
        .env("TOLLGATE_MASTER_KEY", MASTER)
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[tokio::test]
async fn the_cli_manages_keys_teams_and_spend() {
    let up = MockUpstream::start("up").await.unwrap();
    up.set_default(reply_with_usage(20, 10));
    let dir = tempfile::tempdir().unwrap();
    let gw = Gateway::start(&config(
        &up.url(),
        &format!(
            "{PRICING}store:\n  url: sqlite://{}/t.db\n  flush_interval: 50ms\n",
            dir.path().display()
        ),
    ));
    let (ok, out, err) = cli(&gw, &["teams", "create", "--name", "ops", "--rpm", "100"]);
    assert!(ok, "{err}");
    assert!(out.starts_with("ID "), "{out}");
    let (ok, out, err) = cli(
        &gw,
        &[
            "keys",
            "create",
            "--name",
            "deploy",
            "--team",
            "ops",
            "--budget-usd",
            "5",
            "--budget-period",
            "daily",
        ],
    );
    assert!(ok, "{err}");
    let secret = out
        .lines()
        .find_map(|l| l.strip_prefix("secret (shown once, store it now): "))
        .unwrap()
        .to_string();
    let id = secret.split('-').nth(1).unwrap().to_string();
    assert_eq!(chat_with(&gw, &secret, &msg("m")).await.0, 200);
    let (ok, out, _) = cli(&gw, &["keys", "list"]);
    assert!(ok);
    let header = out.lines().next().unwrap();
    assert!(
        header.starts_with("ID ") && header.contains("NAME") && header.contains("SPEND_USD"),
        "{out}"
    );
    let row = out.lines().find(|l| l.contains("deploy")).unwrap();
    assert!(row.contains("ops") && row.contains("daily"), "{row}");
    assert!(!out.contains(&secret));
    let (ok, _, err) = cli(&gw, &["keys", "block", &id]);
    assert!(ok, "{err}");
    assert_eq!(chat_with(&gw, &secret, &msg("m")).await.0, 401);
    let (ok, _, _) = cli(&gw, &["keys", "unblock", &id]);
    assert!(ok);
    assert_eq!(chat_with(&gw, &secret, &msg("m")).await.0, 200);
    // Spend, once the rows are written: two answers of 30 micro-dollars.
    let mut v = Value::Null;
    for _ in 0..100 {
        let (ok, out, err) = cli(
            &gw,
            &["spend", "--group-by", "team", "--since", "1d", "--json"],
        );
        assert!(ok, "{err}");
        v = serde_json::from_str(&out).unwrap();
        if v["data"][0]["requests"] == 2 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(v["data"][0]["team_name"], "ops", "{v}");
    assert_eq!(v["data"][0]["spend_micro_usd"], 60);
    // Errors are said, with a failing exit code.
    let (ok, _, err) = cli(&gw, &["keys", "show", "nope"]);
    assert!(!ok);
    assert!(err.contains("404"), "{err}");
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_tollgate"))
        .args(["keys", "list", "--admin", &format!("http://{}", gw.admin)])
        .env_remove("TOLLGATE_MASTER_KEY")
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("TOLLGATE_MASTER_KEY"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_openai_sdk_sees_402_as_an_error_it_does_not_retry() {
    let up = MockUpstream::start("up").await.unwrap();
    let gw = Gateway::start(&config(&up.url(), PRICING));
    // A budget of zero dollars: nothing fits.
    let (_, key) = Admin::new(&gw)
        .create_key(json!({"name": "sdk", "budget": {"max_usd": 0, "period": "total"}}))
        .await;
    let python = std::env::var("TOLLGATE_PYTHON").unwrap_or_else(|_| {
        concat!(env!("CARGO_MANIFEST_DIR"), "/target/pyenv/bin/python").to_string()
    });
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/python/sdk_budget.py");
    let base = gw.url("/v1");
    let out = tokio::task::spawn_blocking(move || {
        std::process::Command::new(python)
            .args([script, &base, &key])
            .output()
            .expect("run python (see scripts/bootstrap)")
    })
    .await
    .unwrap();
    assert!(
        out.status.success(),
        "{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    // One request reached the gateway: the SDK did not retry; none reached the upstream.
    let m = scrape(&gw).await;
    assert!(
        m.contains("tollgate_requests_total{code=\"402\",model=\"m\",upstream=\"none\"} 1"),
        "{m}"
    );
    assert_eq!(up.hits(), 0);
}

#[tokio::test]
async fn a_team_budget_binds_every_key_of_the_team() {
    let up = MockUpstream::start("up").await.unwrap();
    up.set_default(reply_with_usage(20, 10));
    let gw = Gateway::start(&config(&up.url(), PRICING));
    let admin = Admin::new(&gw);
    let body =
        json!({"model": "m", "max_tokens": 10, "messages": [{"role": "user", "content": "hello"}]});
    let reserve = serde_json::to_vec(&body).unwrap().len().div_ceil(4) as i64 + 10;
    // The team has room for two answers of 30 micro-dollars; each key for many more.
    let team_max = 30 + reserve;
    let (s, v) = admin
        .call("POST", "/admin/teams", Some(json!({"name": "lab", "budget": {"max_usd": team_max as f64 / 1e6, "period": "weekly"}})))
        .await;
    assert_eq!(s, 201, "{v}");
    let mut keys = Vec::new();
    for name in ["x", "y"] {
        let (_, k) = admin
            .create_key(
                json!({"name": name, "team": "lab", "budget": {"max_usd": 1.0, "period": "daily"}}),
            )
            .await;
        keys.push(k);
    }
    assert_eq!(chat_with(&gw, &keys[0], &body).await.0, 200);
    assert_eq!(chat_with(&gw, &keys[1], &body).await.0, 200);
    let (s, v) = chat_with(&gw, &keys[0], &body).await;
    assert_eq!(s, 402, "{v}");
    assert_eq!(v["error"]["scope"], "team");
    assert!(
        v["error"]["message"]
            .as_str()
            .unwrap()
            .contains("team `lab`"),
        "{v}"
    );
    // A week from Monday: the reset is the next Monday, midnight UTC.
    let now = chrono::Utc::now().date_naive();
    let days = 7 - i64::from(chrono::Datelike::weekday(&now).num_days_from_monday());
    let monday = now + chrono::Duration::days(days);
    assert_eq!(v["error"]["resets_at"], format!("{monday}T00:00:00Z"));
    // The key's own budget was untouched by the team's refusal.
    let (_, team) = admin.call("GET", "/admin/teams/lab", None).await;
    assert_eq!(team["budget"]["reserved_usd"], 0.0);
    let m = scrape(&gw).await;
    assert!(
        m.contains("tollgate_budget_refusals_total{scope=\"team\"} 1"),
        "{m}"
    );
}

/// Regressions of the admin surface: answers a cache could keep (the 201 carries a
/// one-time secret) or a page could frame; a write without a JSON type; a second
/// `Origin`; names that spoof others on screen; a stored key named like a config key;
/// report filters silently ignored; a store file readable by everyone.
#[tokio::test]
async fn the_admin_api_is_not_cached_framed_spoofed_or_silently_lenient() {
    use std::os::unix::fs::PermissionsExt;
    let up = MockUpstream::start("up").await.unwrap();
    let state = tempfile::tempdir().unwrap();
    let db = state.path().join("private/tollgate.db");
    let gw = Gateway::start(&config(
        &up.url(),
        &format!(
            "keys:\n  - {{name: ops, key: ops-config-key-000000}}\nstore:\n  url: sqlite://{}\n",
            db.display()
        ),
    ));
    let admin = Admin::new(&gw);

    // Headers: no cache may keep an admin answer, no page may frame the listener.
    let r = client()
        .post(gw.admin_url("/admin/keys"))
        .bearer_auth(MASTER)
        .json(&json!({"name": "fresh"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201);
    assert_eq!(r.headers()["cache-control"], "no-store");
    assert_eq!(r.headers()["x-frame-options"], "DENY");
    let r = client().get(gw.admin_url("/ui/")).send().await.unwrap();
    assert_eq!(r.headers()["x-frame-options"], "DENY");

    // A write with a body but no JSON type: 415, and nothing made.
    let r = client()
        .post(gw.admin_url("/admin/keys"))
        .bearer_auth(MASTER)
        .body(r#"{"name":"untyped"}"#)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 415);
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["error"]["code"], "unsupported_media_type");
    let (_, list) = admin.call("GET", "/admin/keys?search=untyped", None).await;
    assert_eq!(list["data"].as_array().unwrap().len(), 0, "{list}");

    // Two Origin headers: the foreign one is not hidden by the own one.
    let r = client()
        .post(gw.admin_url("/admin/keys"))
        .bearer_auth(MASTER)
        .header("origin", format!("http://{}", gw.admin))
        .header("origin", "http://evil.example")
        .json(&json!({"name": "two-origins"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 403);

    // Names with bidirectional or zero-width characters spoof others in lists.
    for name in [
        "alice\u{202E}cipa",
        "bob\u{200B}",
        "\u{2066}carol",
        "d\u{FEFF}",
    ] {
        let (s, v) = admin
            .call("POST", "/admin/keys", Some(json!({ "name": name })))
            .await;
        assert_eq!(
            (s, v["error"]["param"].as_str()),
            (400, Some("name")),
            "{v}"
        );
        let (s, _) = admin
            .call("POST", "/admin/teams", Some(json!({ "name": name })))
            .await;
        assert_eq!(s, 400);
    }
    // A stored key may not take a config key's name.
    let (s, v) = admin
        .call("POST", "/admin/keys", Some(json!({"name": "ops"})))
        .await;
    assert_eq!(
        (s, v["error"]["param"].as_str()),
        (400, Some("name")),
        "{v}"
    );
    assert!(v["error"]["message"]
        .as_str()
        .unwrap()
        .contains("config file"));
    let (id, _) = admin.create_key(json!({"name": "renamed"})).await;
    let (s, _) = admin
        .call(
            "PATCH",
            &format!("/admin/keys/{id}"),
            Some(json!({"name": "ops"})),
        )
        .await;
    assert_eq!(s, 400);

    // Reports: since/until are from/to; an unknown parameter is a 400, not ignored.
    let (s, v) = admin
        .call("GET", "/admin/spend?group_by=model&until=2020-01-01", None)
        .await;
    assert_eq!(s, 200, "{v}");
    assert!(v["to"].as_str().unwrap().starts_with("2020-01-02"), "{v}");
    let (s, v) = admin
        .call("GET", "/admin/usage?since=2020-01-01", None)
        .await;
    assert_eq!(s, 200, "{v}");
    let (s, v) = admin
        .call("GET", "/admin/usage?after=2020-01-01", None)
        .await;
    assert_eq!(
        (s, v["error"]["param"].as_str()),
        (400, Some("after")),
        "{v}"
    );
    let (s, _) = admin
        .call("GET", "/admin/audit?from=2020-01-01&since=2020-01-01", None)
        .await;
    assert_eq!(s, 400);

    // The store holds key digests and spend: owner only.
    let mode = |p: &std::path::Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode(&db), 0o600, "database file");
    assert_eq!(mode(db.parent().unwrap()), 0o700, "database directory");
}
