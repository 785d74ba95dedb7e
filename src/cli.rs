//! Command line: `tollgate [-c FILE] [-t] [-d] [-u]` and `tollgate demo`. `-d` and `-u`
//! map onto Pingora's daemon and graceful-upgrade options.

use crate::app::{self, RunMode};
use crate::config::Config;
use crate::demo::mock::MockUpstream;
use crate::observe;
use clap::{Parser, Subcommand};
use serde_json::Value;
use std::net::SocketAddr;

/// Default config path when `-c` is not given.
pub const DEFAULT_CONFIG: &str = "/etc/tollgate/tollgate.yaml";

/// The embedded demo config; `${TOLLGATE_DEMO_UPSTREAM}` is the in-process mock upstream.
const DEMO_CONFIG: &str = include_str!("../conf/demo.yaml");

#[derive(Parser, Debug)]
#[command(name = "tollgate", version, about = "An LLM API gateway on Pingora")]
pub struct Cli {
    /// Config file.
    #[arg(short = 'c', long = "conf", default_value = DEFAULT_CONFIG, global = true)]
    pub config: String,
    /// Check the config and exit: 0 and "configuration OK", or every error with its path.
    #[arg(short = 't', long = "test")]
    pub test: bool,
    /// Run in the background.
    #[arg(short = 'd', long = "daemon")]
    pub daemon: bool,
    /// Take over the listening sockets of a running instance (graceful upgrade).
    #[arg(short = 'u', long = "upgrade")]
    pub upgrade: bool,
    #[command(subcommand)]
    pub command: Option<Command>,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Run with an embedded mock upstream: no API key and no other server needed.
    Demo {
        /// Proxy listener.
        #[arg(long, default_value = "127.0.0.1:8080")]
        listen: SocketAddr,
        /// Admin listener.
        #[arg(long, default_value = "127.0.0.1:9091")]
        admin_listen: SocketAddr,
    },
    /// Run only the mock OpenAI-compatible upstream (for benchmarks and experiments).
    #[command(hide = true)]
    MockUpstream {
        #[arg(long, default_value = "127.0.0.1:8000")]
        listen: SocketAddr,
        /// Answer every request with an SSE stream of this many events...
        #[arg(long)]
        stream_events: Option<usize>,
        /// ...this many milliseconds apart (also the gap between the events of a model's
        /// streamed answer when --stream-events is not given).
        #[arg(long, default_value = "20")]
        stream_gap_ms: u64,
    },
    /// Translate an nginx config (with its includes) into a Tollgate config on stdout;
    /// what cannot be translated is reported on stderr with file and line.
    ImportNginx {
        /// The nginx config file, e.g. /etc/nginx/nginx.conf.
        file: std::path::PathBuf,
    },
    /// Translate a LiteLLM proxy config into a Tollgate config (stdout, or -o FILE);
    /// every setting without an equivalent is reported on stderr with its path.
    ImportLitellm {
        /// LiteLLM's config file (the one given to `litellm --config`).
        file: std::path::PathBuf,
        /// Write the config here instead of stdout.
        #[arg(short = 'o', long = "output")]
        output: Option<std::path::PathBuf>,
    },
    /// Copy a LiteLLM database's teams and virtual keys (with their spend) into the store
    /// of the config given with -c; the sk- keys clients hold keep working.
    ImportLitellmKeys {
        /// LiteLLM's PostgreSQL URL, read only (default: $LITELLM_DATABASE_URL, which
        /// keeps the password off the command line).
        #[arg(long)]
        from: Option<String>,
        /// Print what would be imported and write nothing.
        #[arg(long)]
        dry_run: bool,
    },
    /// The price each route of each alias is charged at, and where it came from (config,
    /// pricing.file or the shipped table, with its date).
    Pricing {
        /// Print JSON rows instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Manage client keys through the admin API (master key from TOLLGATE_MASTER_KEY).
    Keys {
        #[command(flatten)]
        target: crate::admin::cli::Target,
        #[command(subcommand)]
        command: crate::admin::cli::KeysCommand,
    },
    /// Manage teams through the admin API.
    Teams {
        #[command(flatten)]
        target: crate::admin::cli::Target,
        #[command(subcommand)]
        command: crate::admin::cli::TeamsCommand,
    },
    /// Spend grouped by key, team, model, upstream or day.
    Spend {
        #[command(flatten)]
        target: crate::admin::cli::Target,
        #[command(flatten)]
        args: crate::admin::cli::SpendArgs,
    },
}

fn env(name: &str) -> Option<String> {
    std::env::var(name).ok()
}

/// The config at `path`, or `None` once every error of it is printed.
fn load(path: &str) -> Option<Config> {
    match Config::load(path, &env) {
        Ok(c) => Some(c),
        Err(errors) => {
            eprintln!("tollgate: configuration {path} has errors:");
            for e in &errors.0 {
                eprintln!("  {e}");
            }
            None
        }
    }
}

/// Runs the command line; returns the process exit code when it does not serve.
pub fn main(cli: Cli) -> i32 {
    let code = command(cli);
    // Log lines are batched while the server runs: none may wait in memory at exit.
    crate::observe::flush_logs();
    code
}

fn command(cli: Cli) -> i32 {
    match cli.command {
        Some(Command::Demo {
            listen,
            admin_listen,
        }) => demo(listen, admin_listen),
        Some(Command::MockUpstream {
            listen,
            stream_events,
            stream_gap_ms,
        }) => mock_upstream(listen, stream_events, stream_gap_ms),
        Some(Command::Keys { target, command }) => crate::admin::cli::keys(&target, command),
        Some(Command::Teams { target, command }) => crate::admin::cli::teams(&target, command),
        Some(Command::Spend { target, args }) => crate::admin::cli::spend(&target, &args),
        Some(Command::ImportNginx { file }) => match crate::import::nginx::import(&file) {
            Ok(import) => {
                for w in &import.warnings {
                    eprintln!("{w}");
                }
                eprintln!(
                    "tollgate: {} directive(s) not carried over as they were; check them above",
                    import.warnings.len()
                );
                print!("# Imported from {} by tollgate import-nginx.\n# Check it with: tollgate -t -c FILE\n{}", file.display(), import.yaml);
                0
            }
            Err(e) => {
                eprintln!("tollgate: {e}");
                1
            }
        },
        Some(Command::Pricing { json }) => match load(&cli.config) {
            Some(config) => {
                if json {
                    println!("{}", Value::Array(crate::admin::pricing::rows(&config)));
                } else {
                    print!("{}", crate::admin::pricing::report(&config));
                }
                0
            }
            None => 1,
        },
        Some(Command::ImportLitellm { file, output }) => import_litellm(&file, output.as_deref()),
        Some(Command::ImportLitellmKeys { from, dry_run }) => {
            import_litellm_keys(&cli.config, from, dry_run)
        }
        None => {
            let Some(config) = load(&cli.config) else {
                return 1;
            };
            for w in config.warnings() {
                eprintln!("tollgate: warning: {w}");
            }
            if cli.test {
                match crate::store::Store::check(&config.store.url) {
                    Ok(state) => println!("tollgate: store {state}"),
                    Err(e) => {
                        eprintln!(
                            "tollgate: configuration {} has errors:\n  store.url: {e}",
                            cli.config
                        );
                        return 1;
                    }
                }
                println!("tollgate: configuration {} OK", cli.config);
                return 0;
            }
            if let Err(e) = observe::init_logging(config.log.file.as_deref()) {
                eprintln!("tollgate: cannot open log file: {e}");
                return 1;
            }
            app::run(
                config,
                RunMode {
                    daemon: cli.daemon,
                    upgrade: cli.upgrade,
                    // Absolute, since a daemon changes its working directory.
                    config_path: Some(
                        std::fs::canonicalize(&cli.config)
                            .map_or(cli.config.clone(), |p| p.display().to_string()),
                    ),
                },
            )
        }
    }
}

fn mock_upstream(listen: SocketAddr, stream_events: Option<usize>, gap_ms: u64) -> i32 {
    let upstream = match MockUpstream::start_in_thread("the mock upstream", listen) {
        Ok(u) => u,
        Err(e) => {
            eprintln!("tollgate: cannot start the mock upstream on {listen}: {e}");
            return 1;
        }
    };
    if let Some(n) = stream_events {
        let event = "data: {\"choices\":[{\"index\":0,\"delta\":{\"content\":\"token \"},\"finish_reason\":null}]}\n\n".to_string();
        upstream.set_default(crate::demo::mock::Reply::Stream {
            events: std::iter::repeat_n(event, n)
                .chain(["data: [DONE]\n\n".to_string()])
                .collect(),
            gap: std::time::Duration::from_millis(gap_ms),
            cut: false,
        });
    } else {
        upstream.set_stream_gap(std::time::Duration::from_millis(gap_ms));
    }
    println!("tollgate: mock upstream on {}", upstream.url());
    loop {
        std::thread::park();
    }
}

fn demo(listen: SocketAddr, admin_listen: SocketAddr) -> i32 {
    let _ = observe::init_logging(None);
    let upstream = match MockUpstream::start_in_thread(
        "the Tollgate demo upstream",
        "127.0.0.1:0".parse().unwrap_or(listen),
    ) {
        Ok(u) => u,
        Err(e) => {
            eprintln!("tollgate: cannot start the demo upstream: {e}");
            return 1;
        }
    };
    let upstream_url = upstream.url();
    // A fresh database for each demo run, in the temporary directory.
    let db = std::env::temp_dir().join(format!("tollgate-demo-{}.db", std::process::id()));
    for suffix in ["", "-wal", "-shm"] {
        let _ = std::fs::remove_file(format!("{}{suffix}", db.display()));
    }
    let store_url = format!("sqlite://{}", db.display());
    let lookup = |name: &str| match name {
        "TOLLGATE_DEMO_STORE" => Some(store_url.clone()),
        "TOLLGATE_DEMO_UPSTREAM" => Some(upstream_url.clone()),
        "TOLLGATE_DEMO_LISTEN" => Some(listen.to_string()),
        "TOLLGATE_DEMO_ADMIN" => Some(admin_listen.to_string()),
        other => env(other),
    };
    let config = match Config::parse(DEMO_CONFIG, &lookup) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("tollgate: demo config: {e}");
            return 1;
        }
    };
    println!("tollgate demo: mock upstream at {upstream_url}");
    println!("tollgate demo: database {}", db.display());
    println!(
        "tollgate demo: admin API at http://{admin_listen}/admin/ with master key demo-admin-master-key"
    );
    println!(
        "tollgate demo: admin console at http://{admin_listen}/ui/ (sign in with demo-admin-master-key, or demo-admin-viewer-key to read only)"
    );
    println!("tollgate demo: try");
    println!(
        "  curl -s http://{listen}/v1/chat/completions -H 'Authorization: Bearer demo-key' \\\n    -H 'content-type: application/json' -d '{{\"model\":\"demo\",\"messages\":[{{\"role\":\"user\",\"content\":\"hi\"}}]}}'"
    );
    println!(
        "  curl -sN http://{listen}/v1/chat/completions -H 'Authorization: Bearer demo-key' \\\n    -H 'content-type: application/json' -d '{{\"model\":\"demo\",\"stream\":true,\"messages\":[{{\"role\":\"user\",\"content\":\"hi\"}}]}}'"
    );
    println!("  curl -s http://{admin_listen}/admin/keys -H 'Authorization: Bearer demo-admin-master-key' \\\n    -H 'content-type: application/json' -d '{{\"name\":\"alice\",\"budget\":{{\"max_usd\":1,\"period\":\"daily\"}}}}'");
    println!("  curl -s 'http://{admin_listen}/admin/spend?group_by=key' -H 'Authorization: Bearer demo-admin-master-key'");
    app::run(config, RunMode::default())
}

fn import_litellm(file: &std::path::Path, output: Option<&std::path::Path>) -> i32 {
    let import = match crate::import::litellm::import(file) {
        Ok(i) => i,
        Err(e) => {
            eprintln!("tollgate: {e}");
            return 1;
        }
    };
    for w in &import.warnings {
        eprintln!("{w}");
    }
    eprintln!(
        "tollgate: {} setting(s) not carried over as they were; check them above",
        import.warnings.len()
    );
    let text = format!(
        "# Imported from {} by tollgate import-litellm.\n# Check it with: tollgate -t -c FILE\n{}",
        file.display(),
        import.yaml
    );
    match output {
        None => {
            print!("{text}");
            0
        }
        Some(path) => match std::fs::write(path, text) {
            Ok(()) => 0,
            Err(e) => {
                eprintln!("tollgate: cannot write {}: {e}", path.display());
                1
            }
        },
    }
}

fn import_litellm_keys(config_path: &str, from: Option<String>, dry_run: bool) -> i32 {
    let Some(from) = from.or_else(|| env("LITELLM_DATABASE_URL")) else {
        eprintln!("tollgate: give LiteLLM's database with --from or LITELLM_DATABASE_URL");
        return 1;
    };
    let read = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| crate::store::StoreError(e.to_string()))
        .and_then(|rt| rt.block_on(crate::store::litellm::read(&from)));
    let (teams, keys) = match read {
        Ok(r) => r,
        Err(e) => {
            eprintln!("tollgate: {e}");
            return 1;
        }
    };
    let now = crate::clock::Clock::now_ms(&crate::clock::SystemClock);
    let plan = crate::admin::litellm::plan(&teams, &keys, now);
    if dry_run {
        print!("{}", plan.describe(now));
        println!("tollgate: dry run: nothing written");
        return 0;
    }
    let Some(config) = load(config_path) else {
        return 1;
    };
    for n in &plan.notes {
        eprintln!("tollgate: note: {n}");
    }
    let (n_teams, n_keys) = (plan.teams.len(), plan.keys.len());
    let carried: i64 = plan.carried.iter().map(|r| r.cost_micro).sum();
    match plan.apply(&config.store.url, now) {
        Ok(()) => {
            println!(
                "tollgate: imported {n_teams} team(s) and {n_keys} key(s) from LiteLLM, with ${} of spend",
                crate::relay::pricing::usd(carried)
            );
            0
        }
        Err(e) => {
            eprintln!("tollgate: {e}");
            1
        }
    }
}
