#!/usr/bin/env bash
# What tracing costs, in one run on this machine: three Tollgates (release build, the
# features of benches/common.sh on) in front of the mock upstream, the same config but
# for `tracing`: off, on with sample_ratio 0.01, and on with 1.0, exporting to a loopback
# OTLP/HTTP sink. wrk drives each with CONNS connections for DURATION seconds; runs
# alternate, ROUNDS times; medians of throughput and of the gateway's CPU per request
# are printed, with each ratio to tracing off, and the spans each gateway exported.
#
#   benches/tracing.sh                # 5 s runs, 3 rounds, 16 connections
#   DURATION=10 ROUNDS=5 benches/tracing.sh
set -euo pipefail
cd "$(dirname "$0")/.."
DURATION=${DURATION:-5}
ROUNDS=${ROUNDS:-3}
CONNS=${CONNS:-16}

# shellcheck source=benches/common.sh
. benches/common.sh
need_tools wrk:wrk curl:curl
if [ -z "${BIN:-}" ]; then
  cargo build --release --quiet
  BIN=target/release/tollgate
fi

with_workdir

MOCK=$(free_port); SINK=$(free_port)
KEY=tg-bench-key-0123456789
$BIN mock-upstream --listen 127.0.0.1:$MOCK >/dev/null & pids+=($!)
# The collector: answers every export 200 and counts what it received.
python3 - "$SINK" "$work/sink.count" <<'PY' & pids+=($!)
import sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
count = [0, 0]
class Sink(BaseHTTPRequestHandler):
    def do_POST(self):
        body = self.rfile.read(int(self.headers.get("content-length", 0)))
        count[0] += 1; count[1] += len(body)
        open(sys.argv[2], "w").write(f"{count[0]} {count[1]}\n")
        self.send_response(200); self.send_header("content-length", "0"); self.end_headers()
    def log_message(self, *a): pass
ThreadingHTTPServer(("127.0.0.1", int(sys.argv[1])), Sink).serve_forever()
PY
SINK_PID=$!

names=(off sampled all)
tracing_of() { case $1 in
  off) echo "";;
  sampled) printf 'tracing:\n  otlp: {endpoint: "http://127.0.0.1:%s"}\n  sample_ratio: 0.01\n' "$SINK";;
  all) printf 'tracing:\n  otlp: {endpoint: "http://127.0.0.1:%s"}\n  sample_ratio: 1.0\n' "$SINK";;
esac; }
declare -A port admin pid
for n in "${names[@]}"; do
  port[$n]=$(free_port); admin[$n]=$(free_port); mkdir -p "$work/$n"
  { tollgate_features "$work/$n" "${port[$n]}" "${admin[$n]}" "$KEY"
    cat <<YAML
upstreams:
  mock: {servers: [{url: "http://127.0.0.1:$MOCK/v1"}]}
models:
  bench: {routes: [{upstream: mock, model: gpt-4o-mini}]}
YAML
    tracing_of "$n"; } > "$work/$n.yaml"
  $BIN -c "$work/$n.yaml" >/dev/null 2>"$work/$n.err" & pid[$n]=$!; pids+=($!)
done
for n in "${names[@]}"; do
  for _ in $(seq 100); do curl -s -o /dev/null "http://127.0.0.1:${port[$n]}/health" && break; sleep 0.2; done
done
write_body "$work/body.json"
write_post_lua "$work/post.lua" "$work/body.json" "$KEY"
HZ=$(getconf CLK_TCK)
cpu_ticks() { awk '{print $14+$15}' "/proc/$1/stat"; }
declare -A rps cpu sink
median() { tr ' ' '\n' | grep -v '^$' | sort -g | awk '{a[NR]=$1} END {print (NR%2 ? a[(NR+1)/2] : (a[NR/2]+a[NR/2+1])/2)}'; }
for round in $(seq "$ROUNDS"); do
  for i in 0 1 2; do
    n=${names[$(( (i + round) % 3 ))]}
    c0=$(cpu_ticks "${pid[$n]}"); s0=$(cpu_ticks "$SINK_PID")
    out=$(wrk -t1 -c"$CONNS" -d"${DURATION}s" -s "$work/post.lua" "http://127.0.0.1:${port[$n]}/v1/chat/completions")
    c1=$(cpu_ticks "${pid[$n]}"); s1=$(cpu_ticks "$SINK_PID")
    done_n=$(echo "$out" | awk '/requests in/ {print $1}')
    if echo "$out" | grep -q Non-2xx; then echo "$n answered non-2xx responses:" >&2; echo "$out" >&2; exit 1; fi
    rps[$n]="${rps[$n]:-} $(echo "$out" | awk '/Requests\/sec/ {print $2}')"
    cpu[$n]="${cpu[$n]:-} $(python3 -c "print(($c1-$c0)/$HZ/$done_n*10000)")"
    sink[$n]="${sink[$n]:-} $(python3 -c "print(($s1-$s0)/$HZ/$done_n*10000)")"
  done
done
sleep 2  # the last batches are sent within batch_delay (1 s)
spans() { local v; v=$(curl -s "http://127.0.0.1:${admin[$1]}/metrics" | awk '/^tollgate_trace_spans_total\{result="exported"\}/ {print $2}'); echo "${v:-0}"; }
echo "| ${DURATION}s x $ROUNDS rounds, $CONNS connections (medians) | tracing off | sample_ratio 0.01 | sample_ratio 1.0 |"
echo "|---|---|---|---|"
r_off=$(echo "${rps[off]}" | median); r_s=$(echo "${rps[sampled]}" | median); r_a=$(echo "${rps[all]}" | median)
c_off=$(echo "${cpu[off]}" | median); c_s=$(echo "${cpu[sampled]}" | median); c_a=$(echo "${cpu[all]}" | median)
awk -v o="$r_off" -v s="$r_s" -v a="$r_a" 'BEGIN {printf "| requests/s | %.0f | %.0f (%.3f x) | %.0f (%.3f x) |\n", o, s, s / o, a, a / o}'
awk -v o="$c_off" -v s="$c_s" -v a="$c_a" 'BEGIN {printf "| gateway CPU seconds per 10,000 requests | %.3f | %.3f (%.3f x) | %.3f (%.3f x) |\n", o, s, s / o, a, a / o}'
awk -v o="$(echo "${sink[off]}" | median)" -v s="$(echo "${sink[sampled]}" | median)" -v a="$(echo "${sink[all]}" | median)" 'BEGIN {printf "| the collector'"'"'s CPU seconds per 10,000 requests (same machine) | %.3f | %.3f | %.3f |\n", o, s, a}'
echo "| spans exported | $(spans off) | $(spans sampled) | $(spans all) |"
echo
echo "collector: $(cat "$work/sink.count" 2>/dev/null || echo '0 0') (export requests, bytes); $(date -u +%F)"
