#!/usr/bin/env bash
# CPU cost per request that does not depend on what else the machine is doing: the
# user-space instructions the proxy process executes per request, counted by valgrind's
# callgrind (the same binary and load give the same count to a few parts per million).
# Tollgate (auth, rate limits, metrics and the access log on; then with a stored key under
# budgets; then with its limits shared through a Redis of its own) and nginx (same setup as
# benches/load.sh) each proxy N non-streaming ~1 KB chat completions to the mock
# upstream, after a warm-up whose counts are discarded. Kernel time (the TCP stack) is
# not counted: benches/load.sh measures whole CPU time.
#
#   benches/instructions.sh            # N=4000 requests, 8 concurrent
#   N=10000 benches/instructions.sh
#   ONLY=translation benches/instructions.sh   # only the translated cases
#   ONLY=core benches/instructions.sh          # all but the translated cases
#   KEEP=DIR benches/instructions.sh           # keeps the callgrind profiles in DIR
#   BIN=path/to/tollgate benches/instructions.sh   # another build
set -euo pipefail
cd "$(dirname "$0")/.."
N=${N:-4000}
N_STREAM=${N_STREAM:-1000}
WARMUP=${WARMUP:-500}
OUT=${OUT:-}

# shellcheck source=benches/common.sh
. benches/common.sh
need_tools nginx:nginx hey:hey curl:curl valgrind:valgrind callgrind_control:valgrind redis-server:redis-server
NGINX=$(command -v nginx || echo /usr/sbin/nginx)
# BIN=path/to/tollgate measures another build (an earlier commit's, or one with line
# tables for annotating a KEEP profile by source line).
if [ -z "${BIN:-}" ]; then
  cargo build --release --quiet
  BIN=target/release/tollgate
fi

with_workdir

MOCK=$(free_port); NGX=$(free_port); TG=$(free_port); ADMIN=$(free_port)
KEY=tg-bench-key-0123456789
$BIN mock-upstream --listen 127.0.0.1:$MOCK --stream-gap-ms 0 >/dev/null & pids+=($!)

mkdir -p "$work/nginx"
cat > "$work/nginx.conf" <<NGINX
worker_processes 1;
master_process off;
daemon off;
pid $work/nginx.pid;
error_log $work/nginx-error.log warn;
events { worker_connections 10000; }
http {
    access_log $work/nginx-access.log;
    client_body_temp_path $work/nginx; proxy_temp_path $work/nginx; fastcgi_temp_path $work/nginx;
    uwsgi_temp_path $work/nginx; scgi_temp_path $work/nginx;
    upstream mock { least_conn; server 127.0.0.1:$MOCK; keepalive 64; }
    server {
        listen 127.0.0.1:$NGX;
        proxy_http_version 1.1;
        proxy_set_header Connection "";
        proxy_buffering off;
        location /v1/ { proxy_pass http://mock; }
    }
}
NGINX

{
  tollgate_features "$work" "$TG" "$ADMIN" "$KEY"
  cat <<YAML
upstreams:
  mock: {balance: least_conn, servers: [{url: "http://127.0.0.1:$MOCK/v1"}]}
models:
  bench: {routes: [{upstream: mock}]}
YAML
} > "$work/tollgate.yaml"
write_body "$work/body.json"

# ratio A B: A / B to three places, or - when B is 0 (a case that did not run).
ratio() { python3 -c 'import sys; a, b = map(float, sys.argv[1:]); print(round(a / b, 3) if b else "-")' "$1" "$2"; }

# phase NAME URL PID KEY BODY REQUESTS CONCURRENCY: warm up, zero the counters, send the
# requests, dump; prints instructions/request. The process keeps running.
phase() {
  local name=$1 url=$2 pid=$3 key=$4 body=$5 n=$6 c=$7
  for _ in $(seq 100); do curl -s -o /dev/null "$url" && break; sleep 0.3; done
  local post=(-m POST -H "Authorization: Bearer $key" -T application/json -D "$body")
  hey -n "$WARMUP" -c "$c" "${post[@]}" "$url" >/dev/null
  # Usage rows are written a second at a time (store.flush_interval): wait out a flush
  # on both sides, so the counts hold the writing of exactly the measured requests' rows
  # (without it, how many rows fell inside the window moved the total by up to 8k).
  sleep 1.5
  callgrind_control -z "$pid" >/dev/null 2>&1
  hey -n "$n" -c "$c" "${post[@]}" "$url" > "$work/hey-$name.txt"
  sleep 1.5
  callgrind_control -d "$pid" >/dev/null 2>&1
  sleep 1
  if ! grep -q "\[200\].*$n responses" "$work/hey-$name.txt"; then
    echo "warning: $name did not answer all $n requests with 200:" >&2
    grep -A3 "Status code" "$work/hey-$name.txt" >&2 || true
  fi
  local f total
  f=$(ls -t "$work"/cg-*.out* | head -1)
  total=$(awk '/^(summary|totals):/ {print $2; exit}' "$f")
  echo $((total / n))
}

# count NAME URL PID [KEY]: one phase of N requests, then stops the process.
count() {
  local name=$1 url=$2 pid=$3 key=${4:-$KEY}
  phase "$name" "$url" "$pid" "$key" "$work/body.json" "$N" 8
  kill "$pid" 2>/dev/null || true
  wait "$pid" 2>/dev/null || true
}

if [ "${ONLY:-}" != translation ]; then
RUST_LOG=info valgrind --tool=callgrind --callgrind-out-file="$work/cg-tollgate.out" \
  $BIN -c "$work/tollgate.yaml" >/dev/null 2>"$work/vg-tollgate.err" &
tg=$(count tollgate "http://127.0.0.1:$TG/v1/chat/completions" $!)

# The same with a key from the store, in a team, under an enforced budget (priced model),
# once the first process has let go of the ports.
for _ in $(seq 300); do curl -s -o /dev/null "http://127.0.0.1:$ADMIN/health" || break; sleep 0.1; done
rm -f "$work"/tollgate.db*
{ cat "$work/tollgate.yaml"; echo "pricing: {bench: {input: 0.01, output: 0.01}}"; } > "$work/tollgate-stored.yaml"
RUST_LOG=info valgrind --tool=callgrind --callgrind-out-file="$work/cg-stored.out" \
  $BIN -c "$work/tollgate-stored.yaml" >/dev/null 2>"$work/vg-stored.err" &
stored_pid=$!
admin() {
  curl -s -H 'Authorization: Bearer bench-master-key' -H 'content-type: application/json' "$@"
}
for _ in $(seq 100); do admin -o /dev/null "http://127.0.0.1:$ADMIN/admin/teams" && break; sleep 0.3; done
admin -o /dev/null -d '{"name":"bench-team","budget":{"max_usd":1000000,"period":"monthly"}}' "http://127.0.0.1:$ADMIN/admin/teams"
STORED=$(admin -d '{"name":"stored","team":"bench-team","limits":{"rpm":100000000},"budget":{"max_usd":1000000,"period":"daily"}}' \
  "http://127.0.0.1:$ADMIN/admin/keys" | python3 -c 'import json,sys; print(json.load(sys.stdin)["key"])')
st=$(count stored "http://127.0.0.1:$TG/v1/chat/completions" $stored_pid "$STORED")
# The config key again, its limits counted in a Redis of its own (cluster.redis, on a unix
# socket): what sharing limits between instances costs the gateway (Redis's own work is
# another process, not counted).
for _ in $(seq 300); do curl -s -o /dev/null "http://127.0.0.1:$ADMIN/health" || break; sleep 0.1; done
redis-server --port 0 --unixsocket "$work/redis.sock" --save "" --appendonly no --dir "$work" >/dev/null & pids+=($!)
for _ in $(seq 100); do [ -S "$work/redis.sock" ] && break; sleep 0.1; done
rm -f "$work"/tollgate.db*
{ cat "$work/tollgate.yaml"; echo "cluster: {redis: \"redis+unix://$work/redis.sock\"}"; } > "$work/tollgate-shared.yaml"
RUST_LOG=info valgrind --tool=callgrind --callgrind-out-file="$work/cg-shared.out" \
  $BIN -c "$work/tollgate-shared.yaml" >/dev/null 2>"$work/vg-shared.err" &
sh=$(count shared "http://127.0.0.1:$TG/v1/chat/completions" $!)
fi
if [ "${ONLY:-}" != core ]; then
# Translation: the same client body to an alias on an OpenAI-compatible route (passed
# through) and to one on an Anthropic route (translated both ways), whole and streamed. The
# mock streams its answer word by word with no gap; each stream is EVENTS events.
for _ in $(seq 300); do curl -s -o /dev/null "http://127.0.0.1:$ADMIN/health" || break; sleep 0.1; done
rm -f "$work"/tollgate.db*
{
  tollgate_features "$work" "$TG" "$ADMIN" "$KEY"
  cat <<YAML
upstreams:
  mock: {balance: least_conn, servers: [{url: "http://127.0.0.1:$MOCK/v1"}]}
  mock-anthropic: {provider: anthropic, servers: [{url: "http://127.0.0.1:$MOCK/v1", api_key: sk-ant-bench-0000000000}]}
models:
  bench: {routes: [{upstream: mock}]}
  bench-anthropic: {routes: [{upstream: mock-anthropic}]}
YAML
} > "$work/tollgate-translated.yaml"
python3 - "$work" <<'PY'
import json, sys
work = sys.argv[1]
body = json.load(open(f"{work}/body.json"))
for name, model, stream in [("direct", "bench", False), ("anthropic", "bench-anthropic", False),
                            ("direct-stream", "bench", True), ("anthropic-stream", "bench-anthropic", True)]:
    b = dict(body, model=model)
    if stream:
        b.update(stream=True, stream_options={"include_usage": True})
    json.dump(b, open(f"{work}/body-{name}.json", "w"))
PY
RUST_LOG=info valgrind --tool=callgrind --callgrind-out-file="$work/cg-translated.out" \
  $BIN -c "$work/tollgate-translated.yaml" >/dev/null 2>"$work/vg-translated.err" &
tr_pid=$!
chat="http://127.0.0.1:$TG/v1/chat/completions"
tr_direct=$(phase tr-direct "$chat" $tr_pid "$KEY" "$work/body-direct.json" "$N" 8)
tr_whole=$(phase tr-whole "$chat" $tr_pid "$KEY" "$work/body-anthropic.json" "$N" 8)
tr_direct_stream=$(phase tr-direct-stream "$chat" $tr_pid "$KEY" "$work/body-direct-stream.json" "$N_STREAM" 8)
tr_stream=$(phase tr-stream "$chat" $tr_pid "$KEY" "$work/body-anthropic-stream.json" "$N_STREAM" 8)
# Events per stream, as the client saw them (content deltas, usage, [DONE]).
events=$(curl -s -N -H "Authorization: Bearer $KEY" -H 'content-type: application/json' \
  --data-binary @"$work/body-anthropic-stream.json" "$chat" 2>/dev/null | grep -c '^data:' || true)
kill $tr_pid 2>/dev/null || true
wait $tr_pid 2>/dev/null || true
else
  tr_direct=0 tr_whole=0 tr_direct_stream=0 tr_stream=0 events=0
fi

if [ "${ONLY:-}" = translation ]; then
  cat <<TABLE
| Tollgate, user-space instructions per request, OpenAI client | OpenAI-compatible route (passed through) | Anthropic route (translated) | translated / passed through |
|---|---|---|---|
| whole answer ($N requests) | $tr_direct | $tr_whole | $(python3 -c "print(round($tr_whole/$tr_direct, 3))") |
| streamed answer ($N_STREAM requests) | $tr_direct_stream | $tr_stream | $(python3 -c "print(round($tr_stream/$tr_direct_stream, 3))") |

Translating a streamed answer costs $(python3 -c "print(round(($tr_stream-$tr_direct_stream)/max($events,1)))") instructions per client event more than passing it through ($events events per stream).
TABLE
  [ -n "${KEEP:-}" ] && mkdir -p "$KEEP" && cp "$work"/cg-translated.out* "$KEEP"/ 2>/dev/null
  exit 0
fi
valgrind --tool=callgrind --callgrind-out-file="$work/cg-nginx.out" \
  "$NGINX" -c "$work/nginx.conf" -p "$work" 2>"$work/vg-nginx.err" &
ngx=$(count nginx "http://127.0.0.1:$NGX/v1/chat/completions" $!)

table=$(cat <<TABLE
| user-space instructions per request | nginx | Tollgate | Tollgate / nginx |
|---|---|---|---|
| non-streaming 1 KB chat completion ($N requests, 8 concurrent) | $ngx | $tg | $(python3 -c "print(round($tg/$ngx, 2))") |

| Tollgate, user-space instructions per request | config key, no budget | stored key in a team, two enforced budgets, usage rows to SQLite | stored / config |
|---|---|---|---|
| same requests | $tg | $st | $(python3 -c "print(round($st/$tg, 3))") |

| Tollgate, user-space instructions per request | config key, limits in process | the same limits shared through Redis (cluster.redis) | shared / in process |
|---|---|---|---|
| same requests | $tg | $sh | $(python3 -c "print(round($sh/$tg, 3))") |

| Tollgate, user-space instructions per request, OpenAI client | OpenAI-compatible route (passed through) | Anthropic route (translated) | translated / passed through |
|---|---|---|---|
| whole answer ($N requests) | $tr_direct | $tr_whole | $(ratio "$tr_whole" "$tr_direct") |
| streamed answer ($N_STREAM requests) | $tr_direct_stream | $tr_stream | $(ratio "$tr_stream" "$tr_direct_stream") |

Translating a streamed answer costs $(python3 -c "print(round(($tr_stream-$tr_direct_stream)/max($events,1)))") instructions per client event more than passing it through ($events events per stream).

callgrind, $(valgrind --version); nginx $("$NGINX" -v 2>&1 | sed 's/.*nginx\///'); $(date -u +%F).
TABLE
)
echo "$table"
if [ -n "$OUT" ]; then echo "$table" > "$OUT"; fi
if [ -n "${KEEP:-}" ]; then mkdir -p "$KEEP"; cp "$work"/cg-*.out* "$KEEP"/ 2>/dev/null || true; fi
