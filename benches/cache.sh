#!/usr/bin/env bash
# The response cache's worth, in one run on this machine: Tollgate (release build, the
# features of benches/common.sh on) in front of the mock upstream, answering the same
# non-streaming 1 KB chat completion for an alias with `cache: {ttl: 10m}`, either from
# the cache (hits) or from the upstream every time (`Cache-Control: no-store`: the path a
# miss takes, without storing). hey drives each for DURATION seconds with CONNS
# connections; runs alternate, ROUNDS times, and the medians are printed as ratios.
#
#   benches/cache.sh                  # 5 s runs, 3 rounds, 16 connections
#   DURATION=8 ROUNDS=5 benches/cache.sh
set -euo pipefail
cd "$(dirname "$0")/.."
DURATION=${DURATION:-5}
ROUNDS=${ROUNDS:-3}
CONNS=${CONNS:-16}

# shellcheck source=benches/common.sh
. benches/common.sh
need_tools hey:hey curl:curl
cargo build --release --quiet
BIN=target/release/tollgate

with_workdir

MOCK=$(free_port); TG=$(free_port); ADMIN=$(free_port)
KEY=tg-bench-key-0123456789
$BIN mock-upstream --listen 127.0.0.1:$MOCK >/dev/null & pids+=($!)
{
  tollgate_features "$work" "$TG" "$ADMIN" "$KEY"
  cat <<YAML
upstreams:
  mock: {servers: [{url: "http://127.0.0.1:$MOCK/v1"}]}
models:
  bench: {routes: [{upstream: mock}], cache: {ttl: 10m}}
YAML
} > "$work/tollgate.yaml"
write_body "$work/body.json"
$BIN -c "$work/tollgate.yaml" >/dev/null 2>"$work/tollgate.err" & pids+=($!)
url=http://127.0.0.1:$TG/v1/chat/completions
for _ in $(seq 100); do curl -s -o /dev/null "http://127.0.0.1:$TG/health" && break; sleep 0.2; done
# The first request stores the answer.
curl -s -o /dev/null -H "Authorization: Bearer $KEY" -H 'content-type: application/json' -d @"$work/body.json" "$url"

run() { # run NAME [HEADER]: prints "req/s p50_ms p99_ms"
  local extra=()
  [ -n "${2:-}" ] && extra=(-H "$2")
  hey -z "${DURATION}s" -c "$CONNS" -m POST -H "Authorization: Bearer $KEY" -T application/json \
    "${extra[@]}" -D "$work/body.json" "$url" > "$work/hey-$1.txt"
  awk '/Requests\/sec/ {rps=$2} /50% in/ {p50=$3*1000} /99% in/ {p99=$3*1000} END {printf "%.0f %.2f %.2f\n", rps, p50, p99}' "$work/hey-$1.txt"
}
median() { sort -n | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}'; }

: > "$work/hit"; : > "$work/miss"
for _ in $(seq "$ROUNDS"); do
  run hit >> "$work/hit"
  run miss "Cache-Control: no-store" >> "$work/miss"
done
col() { awk -v c="$2" '{print $c}' "$work/$1" | median; }
hit_rps=$(col hit 1); miss_rps=$(col miss 1)
hit_p50=$(col hit 2); miss_p50=$(col miss 2); hit_p99=$(col hit 3); miss_p99=$(col miss 3)
hits=$(curl -s "http://127.0.0.1:$ADMIN/metrics" | awk '/^tollgate_cache_lookups_total\{result="hit"\}/ {print $2}')
echo "| $CONNS connections, ${DURATION}s x $ROUNDS rounds (medians) | hit | miss (upstream) | hit / miss |"
echo "|---|---|---|---|"
awk -v a="$hit_rps" -v b="$miss_rps" 'BEGIN {printf "| requests/s | %d | %d | %.2f |\n", a, b, a/b}'
awk -v a="$hit_p50" -v b="$miss_p50" 'BEGIN {printf "| p50 latency (ms) | %.2f | %.2f | %.2f |\n", a, b, a/b}'
awk -v a="$hit_p99" -v b="$miss_p99" 'BEGIN {printf "| p99 latency (ms) | %.2f | %.2f | %.2f |\n", a, b, a/b}'
echo
echo "cache hits counted by the gateway: $hits; $(date -u +%F)"
