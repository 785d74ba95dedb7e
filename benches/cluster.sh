#!/usr/bin/env bash
# What sharing state through Redis costs, in one run on this machine: two Tollgates
# (release build, the features of benches/common.sh on, and a budget on the config key)
# in front of the mock upstream, the same config except that one counts its limits and
# budget in the process and the other in a Redis of its own (cluster.redis, on loopback
# TCP). hey drives each at a fixed RATE for the added p50/p99 latency, and with CONNS
# connections for throughput; runs alternate, ROUNDS times, medians are printed, and
# Redis's own command counts give the calls made per request.
#
#   benches/cluster.sh                # 5 s runs, 3 rounds, 500 req/s, 16 connections
#   DURATION=8 ROUNDS=5 RATE=1000 benches/cluster.sh
set -euo pipefail
cd "$(dirname "$0")/.."
DURATION=${DURATION:-5}
ROUNDS=${ROUNDS:-3}
RATE=${RATE:-500}
CONNS=${CONNS:-16}

# shellcheck source=benches/common.sh
. benches/common.sh
need_tools hey:hey curl:curl redis-server:redis-server redis-cli:redis-tools
# BIN=path/to/tollgate measures another build (an earlier commit's, for before and after).
if [ -z "${BIN:-}" ]; then
  cargo build --release --quiet
  BIN=target/release/tollgate
fi

with_workdir

MOCK=$(free_port); LOCAL=$(free_port); LOCAL_ADMIN=$(free_port)
SHARED=$(free_port); SHARED_ADMIN=$(free_port); REDIS=$(free_port)
KEY=tg-bench-key-0123456789
$BIN mock-upstream --listen 127.0.0.1:$MOCK >/dev/null & pids+=($!)
redis-server --bind 127.0.0.1 --port "$REDIS" --save "" --appendonly no --dir "$work" >/dev/null & pids+=($!)

config() { # config DIR PORT ADMIN [EXTRA]
  mkdir -p "$1"
  tollgate_features "$1" "$2" "$3" "$KEY" | sed "s|limits: {rpm: 100000000, tpm: 100000000000, concurrency: 100000}}|limits: {rpm: 100000000, tpm: 100000000000, concurrency: 100000}, budget: {max_usd: 1000000000, period: monthly}}|"
  cat <<YAML
upstreams:
  mock: {servers: [{url: "http://127.0.0.1:$MOCK/v1"}]}
models:
  bench: {routes: [{upstream: mock, model: gpt-4o-mini}]}
${4:-}
YAML
}
config "$work/local" "$LOCAL" "$LOCAL_ADMIN" > "$work/local.yaml"
config "$work/shared" "$SHARED" "$SHARED_ADMIN" "cluster: {redis: \"redis://127.0.0.1:$REDIS/0\"}" > "$work/shared.yaml"
grep -q "budget: {max_usd" "$work/local.yaml" || { echo "the bench key has no budget" >&2; exit 1; }
write_body "$work/body.json"
$BIN -c "$work/local.yaml" >/dev/null 2>"$work/local.err" & pids+=($!)
$BIN -c "$work/shared.yaml" >/dev/null 2>"$work/shared.err" & pids+=($!)
for port in $LOCAL $SHARED; do
  for _ in $(seq 100); do curl -s -o /dev/null "http://127.0.0.1:$port/health" && break; sleep 0.2; done
done
url() { echo "http://127.0.0.1:$1/v1/chat/completions"; }

# Redis calls per request: its command counts around a known number of requests.
calls() { redis-cli -p "$REDIS" info commandstats | awk -F'[:=,]' -v only="${1:-}" '/^cmdstat_/ && (only == "" || $1 == "cmdstat_" only) {n += $3} END {print n + 0}'; }
N=200
by_command() { redis-cli -p "$REDIS" info commandstats | awk -F'[:=,]' '/^cmdstat_/ {sub("cmdstat_", "", $1); print $1, $3}'; }
by_command > "$work/commands-before"
before=$(calls); before_scripts=$(calls evalsha)
for _ in $(seq $N); do
  curl -s -o /dev/null -w '%{http_code}\n' -H "Authorization: Bearer $KEY" -H 'content-type: application/json' \
    -d @"$work/body.json" "$(url $SHARED)"
done | sort | uniq -c | awk '$2 != 200 {print "unexpected status: " $0; bad=1} END {exit bad}'
sleep 2  # the calls made when requests and leases end are not waited for
after=$(calls); after_scripts=$(calls evalsha)
by_command > "$work/commands-after"
# Which commands, per request (the INFO calls of this measurement included).
breakdown=$(awk -v n="$N" 'NR == FNR {b[$1] = $2; next} {d = $2 - b[$1]; if (d > 0) printf "%s %.2f, ", $1, d / n}' \
  "$work/commands-before" "$work/commands-after" | sed 's/, $//')
# Less the INFO calls of this measurement itself.
per_request=$(awk -v a="$before" -v b="$after" -v n="$N" 'BEGIN {printf "%.2f", (b - a - 2) / n}')
scripts_per_request=$(awk -v a="$before_scripts" -v b="$after_scripts" -v n="$N" 'BEGIN {printf "%.2f", (b - a) / n}')

run() { # run NAME PORT [hey options]: prints "req/s p50_ms p99_ms"
  local name=$1 port=$2; shift 2
  hey -z "${DURATION}s" "$@" -m POST -H "Authorization: Bearer $KEY" -T application/json \
    -D "$work/body.json" "$(url "$port")" > "$work/hey-$name.txt"
  if grep -q "^Error distribution" "$work/hey-$name.txt"; then
    echo "errors in $name:" >&2; sed -n '/^Error distribution/,$p' "$work/hey-$name.txt" >&2; exit 1
  fi
  awk '/Requests\/sec/ {rps=$2} /50% in/ {p50=$3*1000} /99% in/ {p99=$3*1000} END {printf "%.0f %.3f %.3f\n", rps, p50, p99}' "$work/hey-$name.txt"
}
median() { sort -n | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}'; }
for f in rate-local rate-shared tput-local tput-shared; do : > "$work/$f"; done
for _ in $(seq "$ROUNDS"); do
  run rate-local "$LOCAL" -c 10 -q $((RATE / 10)) >> "$work/rate-local"
  run rate-shared "$SHARED" -c 10 -q $((RATE / 10)) >> "$work/rate-shared"
  run tput-local "$LOCAL" -c "$CONNS" >> "$work/tput-local"
  run tput-shared "$SHARED" -c "$CONNS" >> "$work/tput-shared"
done
col() { awk -v c="$2" '{print $c}' "$work/$1" | median; }
echo "| ${DURATION}s x $ROUNDS rounds (medians) | limits and budget in process | shared through Redis | shared - in process |"
echo "|---|---|---|---|"
awk -v a="$(col rate-local 2)" -v b="$(col rate-shared 2)" -v r="$RATE" 'BEGIN {printf "| p50 latency at %d req/s (ms) | %.3f | %.3f | %+.3f |\n", r, a, b, b - a}'
awk -v a="$(col rate-local 3)" -v b="$(col rate-shared 3)" -v r="$RATE" 'BEGIN {printf "| p99 latency at %d req/s (ms) | %.3f | %.3f | %+.3f |\n", r, a, b, b - a}'
awk -v a="$(col tput-local 1)" -v b="$(col tput-shared 1)" -v c="$CONNS" 'BEGIN {printf "| requests/s, %d connections | %d | %d | %.2f x |\n", c, a, b, b / a}'
echo
echo "Redis calls per request, over $N requests: $scripts_per_request script calls (EVALSHA, each one round trip; the gateway sends no other command on the request path); commands run, the scripts' own included: $per_request (by command: $breakdown); redis $(redis-server --version | awk '{print $3}'); $(date -u +%F)"
