#!/usr/bin/env bash
# What tracing costs, in one run on this machine: three Tollgates (release build, the
# features of benches/common.sh on) in front of the mock upstream, the same config but
# for `tracing`: off, on with sample_ratio 0.01, and on with 1.0, exporting to a loopback
# OTLP/HTTP sink (an nginx that reads and drops what it is sent). wrk drives each with
# CONNS connections for DURATION seconds; runs alternate, ROUNDS times; medians of
# throughput and of the gateway's CPU per request are printed, with each ratio to
# tracing off, and the spans each gateway exported.
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
need_tools wrk:wrk curl:curl nginx:nginx
NGINX=$(command -v nginx || echo /usr/sbin/nginx)
if [ -z "${BIN:-}" ]; then
  cargo build --release --quiet
  BIN=target/release/tollgate
fi

with_workdir

MOCK=$(free_port); SINK=$(free_port)
KEY=tg-bench-key-0123456789
$BIN mock-upstream --listen 127.0.0.1:$MOCK >/dev/null & pids+=($!)
# The collector: an nginx that reads every export, answers 200 and logs its size. (A
# collector runs on other machines in production; on these 2 cores its CPU competes with
# the gateway's, so it is one that costs little: a Python sink used about 13 % of the
# gateway's CPU at ratio 1.0.)
mkdir -p "$work/sink"
cat > "$work/sink.conf" <<NGINX
worker_processes 1;
master_process off;
daemon off;
pid $work/sink.pid;
error_log $work/sink-error.log warn;
events { worker_connections 1000; }
http {
    log_format size '\$request_length \$status';
    access_log $work/sink.log size;
    client_body_temp_path $work/sink;
    client_max_body_size 64m;
    server { listen 127.0.0.1:$SINK; location / { return 200; } }
}
NGINX
$NGINX -c "$work/sink.conf" & pids+=($!)
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
echo "collector: $(awk '$2 == 200' "$work/sink.log" | wc -l) export requests answered 200, $(awk '$2 != 200' "$work/sink.log" | wc -l) otherwise; $(date -u +%F)"
