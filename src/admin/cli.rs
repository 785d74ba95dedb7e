//! `tollgate keys ...`, `tollgate teams ...` and `tollgate spend ...`: the admin API from
//! the command line, for operators who run the gateway under systemd. Each command is one
//! HTTP request to the admin listener (`--admin`, default `http://127.0.0.1:9091`) with
//! the master key from `TOLLGATE_MASTER_KEY`; answers print as aligned tables, or as the
//! API's JSON with `--json`.

use clap::{Args, Subcommand};
use serde_json::{json, Map, Value};
use std::time::Duration;

#[derive(Args, Debug, Clone)]
pub struct Target {
    /// The admin listener.
    #[arg(long, default_value = "http://127.0.0.1:9091", global = true)]
    pub admin: String,
    /// Print the API's JSON instead of a table.
    #[arg(long, global = true)]
    pub json: bool,
}

/// Fields shared by create and update.
#[derive(Args, Debug, Clone, Default)]
pub struct Fields {
    #[arg(long)]
    pub name: Option<String>,
    /// Team id or name.
    #[arg(long)]
    pub team: Option<String>,
    /// Allowed aliases, comma-separated.
    #[arg(long, value_delimiter = ',')]
    pub models: Option<Vec<String>>,
    #[arg(long)]
    pub rps: Option<u64>,
    #[arg(long)]
    pub rpm: Option<u64>,
    #[arg(long)]
    pub tpm: Option<u64>,
    #[arg(long)]
    pub concurrency: Option<u64>,
    /// Budget in US dollars.
    #[arg(long)]
    pub budget_usd: Option<f64>,
    /// daily, weekly, monthly or total.
    #[arg(long, default_value = "monthly")]
    pub budget_period: String,
    /// enforce or track.
    #[arg(long, default_value = "enforce")]
    pub budget_mode: String,
    /// Key expiry: an RFC 3339 time.
    #[arg(long)]
    pub expires_at: Option<String>,
    /// Key expiry: a duration from now, such as 30d.
    #[arg(long)]
    pub expires_in: Option<String>,
}

#[derive(Subcommand, Debug)]
pub enum KeysCommand {
    /// Create a key; its secret is printed this once.
    Create(Fields),
    /// List keys (config keys included, marked read-only).
    List {
        #[arg(long)]
        team: Option<String>,
        #[arg(long)]
        search: Option<String>,
    },
    Show {
        id: String,
    },
    /// Change fields of a key.
    Update {
        id: String,
        #[command(flatten)]
        fields: Fields,
    },
    /// A new secret; with --grace the old one works that much longer.
    Rotate {
        id: String,
        #[arg(long)]
        grace: Option<String>,
    },
    Block {
        id: String,
    },
    Unblock {
        id: String,
    },
    Delete {
        id: String,
    },
    /// Forget the spend counted against the key's budget.
    ResetSpend {
        id: String,
    },
}

#[derive(Subcommand, Debug)]
pub enum TeamsCommand {
    Create(Fields),
    List,
    Show {
        id: String,
    },
    Update {
        id: String,
        #[command(flatten)]
        fields: Fields,
    },
    Delete {
        id: String,
    },
}

#[derive(Args, Debug)]
pub struct SpendArgs {
    /// key, team, model, upstream or day.
    #[arg(long, default_value = "key")]
    pub group_by: String,
    /// A duration back from now (30d) or a date.
    #[arg(long)]
    pub since: Option<String>,
    /// A date or RFC 3339 time (exclusive; a date includes its day).
    #[arg(long)]
    pub until: Option<String>,
    /// Print CSV (for finance) instead of a table.
    #[arg(long)]
    pub csv: bool,
}

fn body(f: &Fields) -> Value {
    let mut m = Map::new();
    if let Some(v) = &f.name {
        m.insert("name".into(), v.clone().into());
    }
    if let Some(v) = &f.team {
        m.insert("team".into(), v.clone().into());
    }
    if let Some(v) = &f.models {
        m.insert("models".into(), json!(v));
    }
    let mut limits = Map::new();
    for (k, v) in [
        ("rps", f.rps),
        ("rpm", f.rpm),
        ("tpm", f.tpm),
        ("concurrency", f.concurrency),
    ] {
        if let Some(v) = v {
            limits.insert(k.into(), v.into());
        }
    }
    if !limits.is_empty() {
        m.insert("limits".into(), Value::Object(limits));
    }
    if let Some(usd) = f.budget_usd {
        m.insert(
            "budget".into(),
            json!({"max_usd": usd, "period": f.budget_period, "mode": f.budget_mode}),
        );
    }
    if let Some(v) = &f.expires_at {
        m.insert("expires_at".into(), v.clone().into());
    }
    if let Some(v) = &f.expires_in {
        m.insert("expires_in".into(), v.clone().into());
    }
    Value::Object(m)
}

/// One request to the admin API: the status and the body.
fn call(
    target: &Target,
    method: &str,
    path: &str,
    body: Option<&Value>,
) -> Result<(u16, String), String> {
    let master = std::env::var("TOLLGATE_MASTER_KEY")
        .map_err(|_| "set TOLLGATE_MASTER_KEY to the gateway's admin.master_key".to_string())?;
    let base = target.admin.trim_end_matches('/');
    if !base.starts_with("http://") && !base.starts_with("https://") {
        return Err("--admin must be an http:// or https:// URL (the admin listener)".into());
    }
    let client = reqwest::blocking::Client::builder()
        .timeout(Duration::from_secs(30))
        .build()
        .map_err(|e| format!("cannot build an HTTP client: {e}"))?;
    let method = reqwest::Method::from_bytes(method.as_bytes()).map_err(|e| e.to_string())?;
    let mut request = client
        .request(method, format!("{base}{path}"))
        .bearer_auth(master);
    if let Some(b) = body {
        request = request
            .header("content-type", "application/json")
            .body(b.to_string());
    }
    let response = request.send().map_err(|e| {
        format!(
            "cannot reach the admin listener at {}: {}",
            target.admin,
            crate::transport::client_error(&e)
        )
    })?;
    let status = response.status().as_u16();
    let body = response.text().map_err(|e| {
        format!(
            "cannot read the admin listener's answer: {}",
            crate::transport::client_error(&e)
        )
    })?;
    Ok((status, body))
}

fn cell(v: &Value) -> String {
    match v {
        Value::Null => "-".into(),
        Value::String(s) => s.clone(),
        Value::Array(a) => a.iter().map(cell).collect::<Vec<_>>().join(","),
        Value::Object(o) if o.is_empty() => "-".into(),
        Value::Object(o) => o
            .iter()
            .map(|(k, v)| format!("{k}={}", cell(v)))
            .collect::<Vec<_>>()
            .join(" "),
        other => other.to_string(),
    }
}

/// Rows as an aligned table with the given columns (`a.b` reads a nested field).
pub(super) fn table(rows: &[Value], columns: &[(&str, &str)]) -> String {
    let cells: Vec<Vec<String>> = rows
        .iter()
        .map(|r| {
            columns
                .iter()
                .map(|(_, path)| cell(path.split('.').fold(r, |v, p| &v[p])))
                .collect()
        })
        .collect();
    let widths: Vec<usize> = columns
        .iter()
        .enumerate()
        .map(|(i, (h, _))| {
            cells
                .iter()
                .map(|r| r[i].chars().count())
                .chain([h.len()])
                .max()
                .unwrap_or(0)
        })
        .collect();
    let line = |items: Vec<String>| {
        items
            .iter()
            .zip(&widths)
            .map(|(c, w)| format!("{c:<w$}"))
            .collect::<Vec<_>>()
            .join("  ")
            .trim_end()
            .to_string()
    };
    let mut out = line(columns.iter().map(|(h, _)| h.to_string()).collect());
    out.push('\n');
    for r in cells {
        out.push_str(&line(r));
        out.push('\n');
    }
    out
}

const KEY_COLUMNS: &[(&str, &str)] = &[
    ("ID", "id"),
    ("NAME", "name"),
    ("TEAM", "team.name"),
    ("SOURCE", "source"),
    ("MODELS", "models"),
    ("BUDGET_USD", "budget.max_usd"),
    ("SPEND_USD", "budget.spend_usd"),
    ("PERIOD", "budget.period"),
    ("EXPIRES", "expires_at"),
    ("BLOCKED", "blocked"),
];

const TEAM_COLUMNS: &[(&str, &str)] = &[
    ("ID", "id"),
    ("NAME", "name"),
    ("KEYS", "keys"),
    ("MODELS", "models"),
    ("BUDGET_USD", "budget.max_usd"),
    ("SPEND_USD", "budget.spend_usd"),
    ("PERIOD", "budget.period"),
];

/// Prints an answer; the exit code.
fn show(target: &Target, result: Result<(u16, String), String>, columns: &[(&str, &str)]) -> i32 {
    let (status, text) = match result {
        Ok(r) => r,
        Err(e) => {
            eprintln!("tollgate: {e}");
            return 1;
        }
    };
    let v: Value = serde_json::from_str(&text).unwrap_or(Value::String(text.clone()));
    if !(200..300).contains(&status) {
        let message = v["error"]["message"]
            .as_str()
            .map_or(text.clone(), str::to_string);
        eprintln!("tollgate: {status}: {message}");
        return 1;
    }
    if target.json {
        println!("{}", serde_json::to_string_pretty(&v).unwrap_or(text));
        return 0;
    }
    let rows = match v["data"].as_array() {
        Some(list) => list.clone(),
        None => vec![v.clone()],
    };
    print!("{}", table(&rows, columns));
    if let Some(secret) = v["key"].as_str() {
        println!("\nsecret (shown once, store it now): {secret}");
    }
    0
}

fn enc(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' | b':' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

pub fn keys(target: &Target, cmd: KeysCommand) -> i32 {
    let r = match &cmd {
        KeysCommand::Create(f) => call(target, "POST", "/admin/keys", Some(&body(f))),
        KeysCommand::List { team, search } => {
            let mut q = Vec::new();
            if let Some(t) = team {
                q.push(format!("team={}", enc(t)));
            }
            if let Some(s) = search {
                q.push(format!("search={}", enc(s)));
            }
            call(target, "GET", &format!("/admin/keys?{}", q.join("&")), None)
        }
        KeysCommand::Show { id } => call(target, "GET", &format!("/admin/keys/{}", enc(id)), None),
        KeysCommand::Update { id, fields } => call(
            target,
            "PATCH",
            &format!("/admin/keys/{}", enc(id)),
            Some(&body(fields)),
        ),
        KeysCommand::Rotate { id, grace } => {
            let b = json!({"grace_period": grace});
            call(
                target,
                "POST",
                &format!("/admin/keys/{}/rotate", enc(id)),
                Some(&b),
            )
        }
        KeysCommand::Block { id } => call(
            target,
            "PATCH",
            &format!("/admin/keys/{}", enc(id)),
            Some(&json!({"blocked": true})),
        ),
        KeysCommand::Unblock { id } => call(
            target,
            "PATCH",
            &format!("/admin/keys/{}", enc(id)),
            Some(&json!({"blocked": false})),
        ),
        KeysCommand::Delete { id } => {
            call(target, "DELETE", &format!("/admin/keys/{}", enc(id)), None)
        }
        KeysCommand::ResetSpend { id } => call(
            target,
            "POST",
            &format!("/admin/keys/{}/reset_spend", enc(id)),
            None,
        ),
    };
    show(target, r, KEY_COLUMNS)
}

pub fn teams(target: &Target, cmd: TeamsCommand) -> i32 {
    let r = match &cmd {
        TeamsCommand::Create(f) => call(target, "POST", "/admin/teams", Some(&body(f))),
        TeamsCommand::List => call(target, "GET", "/admin/teams", None),
        TeamsCommand::Show { id } => {
            call(target, "GET", &format!("/admin/teams/{}", enc(id)), None)
        }
        TeamsCommand::Update { id, fields } => call(
            target,
            "PATCH",
            &format!("/admin/teams/{}", enc(id)),
            Some(&body(fields)),
        ),
        TeamsCommand::Delete { id } => {
            call(target, "DELETE", &format!("/admin/teams/{}", enc(id)), None)
        }
    };
    show(target, r, TEAM_COLUMNS)
}

pub fn spend(target: &Target, args: &SpendArgs) -> i32 {
    let mut q = vec![format!("group_by={}", enc(&args.group_by))];
    if let Some(since) = &args.since {
        let from = match humantime::parse_duration(since) {
            Ok(d) => {
                let now = crate::clock::Clock::now_ms(&crate::clock::SystemClock);
                let ms = i64::try_from(d.as_millis()).unwrap_or(i64::MAX);
                crate::clock::rfc3339(now.saturating_sub(ms).max(0))
            }
            Err(_) => since.clone(),
        };
        q.push(format!("from={}", enc(&from)));
    }
    if let Some(until) = &args.until {
        q.push(format!("to={}", enc(until)));
    }
    if args.csv {
        q.push("format=csv".into());
        return match call(
            target,
            "GET",
            &format!("/admin/spend?{}", q.join("&")),
            None,
        ) {
            Ok((200, text)) => {
                print!("{text}");
                0
            }
            other => show(target, other, &[]),
        };
    }
    let group = match args.group_by.as_str() {
        "key" => ("KEY", "key_name"),
        "team" => ("TEAM", "team_name"),
        "model" => ("MODEL", "model"),
        "upstream" => ("UPSTREAM", "upstream"),
        _ => ("DAY", "day"),
    };
    let columns = [
        group,
        ("REQUESTS", "requests"),
        ("INPUT", "input_tokens"),
        ("OUTPUT", "output_tokens"),
        ("CACHED", "cached_tokens"),
        ("SPEND_USD", "spend_usd"),
    ];
    show(
        target,
        call(
            target,
            "GET",
            &format!("/admin/spend?{}", q.join("&")),
            None,
        ),
        &columns,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tables_align_and_read_nested_fields() {
        let rows = vec![
            json!({"id": "a1", "team": {"name": "research"}, "blocked": false}),
            json!({"id": "b22222", "team": null, "blocked": true}),
        ];
        let t = table(
            &rows,
            &[("ID", "id"), ("TEAM", "team.name"), ("BLOCKED", "blocked")],
        );
        assert_eq!(
            t,
            "ID      TEAM      BLOCKED\na1      research  false\nb22222  -         true\n"
        );
        assert_eq!(enc("config:a b"), "config:a%20b");
    }
}
