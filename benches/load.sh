#!/usr/bin/env bash
# Load benchmark on this one machine: the mock upstream, Tollgate (release build, with
# auth, rate limits, metrics and the access log on) and Debian's nginx with an equivalent
# configuration (least_conn, keepalive, proxy_buffering off, HTTP/1.1, access log on),
# each proxy with one worker thread. wrk and hey drive them; runs alternate between
# direct, nginx and Tollgate so that drift on a shared machine hits all three alike.
# Every figure is reported as a ratio measured in the same run.
#
#   benches/load.sh                 # defaults: 8 s per run, 2 rounds, 10,000 idle streams
#   DURATION=5 ROUNDS=1 STREAMS=2000 benches/load.sh
set -euo pipefail
cd "$(dirname "$0")/.."
DURATION=${DURATION:-8}
ROUNDS=${ROUNDS:-2}
STREAMS=${STREAMS:-10000}
RATE=${RATE:-500}          # requests per second for the fixed-rate latency run
CONNS=${CONNS:-32}         # connections for the throughput run
OUT=${OUT:-benches/results.md}

# shellcheck source=benches/common.sh
. benches/common.sh
need_tools nginx:nginx wrk:wrk hey:hey curl:curl
NGINX=$(command -v nginx || echo /usr/sbin/nginx)
cargo build --release --quiet
BIN=target/release/tollgate
ulimit -n 200000 2>/dev/null || ulimit -n "$(ulimit -Hn)"
# A proxied stream holds two descriptors in the proxy (client and upstream side).
max_streams=$(( ($(ulimit -n) - 1000) / 2 ))
if [ "$STREAMS" -gt "$max_streams" ]; then
  echo "note: open-file limit $(ulimit -n) allows $max_streams proxied streams; measuring $max_streams instead of $STREAMS" >&2
  STREAMS=$max_streams
fi

with_workdir

MOCK=$(free_port); IDLE=$(free_port); TTFB=$(free_port); NGX=$(free_port); TG=$(free_port); ADMIN=$(free_port)
KEY=tg-bench-key-0123456789

$BIN mock-upstream --listen 127.0.0.1:$MOCK >/dev/null & pids+=($!)
$BIN mock-upstream --listen 127.0.0.1:$IDLE --stream-events 1000 --stream-gap-ms 600000 >/dev/null & pids+=($!)
$BIN mock-upstream --listen 127.0.0.1:$TTFB --stream-events 5 --stream-gap-ms 10 >/dev/null & pids+=($!)

mkdir -p "$work/nginx"
cat > "$work/nginx.conf" <<NGINX
worker_processes 1;
worker_rlimit_nofile 200000;
pid $work/nginx.pid;
error_log $work/nginx-error.log warn;
events { worker_connections 100000; }
http {
    access_log $work/nginx-access.log;
    client_body_temp_path $work/nginx; proxy_temp_path $work/nginx; fastcgi_temp_path $work/nginx;
    uwsgi_temp_path $work/nginx; scgi_temp_path $work/nginx;
    client_max_body_size 32m;
    upstream mock { least_conn; server 127.0.0.1:$MOCK; keepalive 64; }
    upstream idle { least_conn; server 127.0.0.1:$IDLE; keepalive 64; }
    upstream ttfb { least_conn; server 127.0.0.1:$TTFB; keepalive 64; }
    server {
        listen 127.0.0.1:$NGX;
        proxy_http_version 1.1;
        proxy_set_header Connection "";
        proxy_buffering off;
        proxy_read_timeout 900s;
        location /v1/ { proxy_pass http://mock; }
        location /idle/v1/ { proxy_pass http://idle/v1/; }
        location /ttfb/v1/ { proxy_pass http://ttfb/v1/; }
    }
}
NGINX
"$NGINX" -c "$work/nginx.conf" -p "$work" 2>/dev/null

{
  tollgate_features "$work" "$TG" "$ADMIN" "$KEY"
  cat <<YAML
upstreams:
  mock: {balance: least_conn, servers: [{url: "http://127.0.0.1:$MOCK/v1"}]}
  idle: {balance: least_conn, idle_timeout: 900s, servers: [{url: "http://127.0.0.1:$IDLE/v1"}]}
  ttfb: {balance: least_conn, servers: [{url: "http://127.0.0.1:$TTFB/v1"}]}
models:
  bench: {routes: [{upstream: mock}]}
  idle: {routes: [{upstream: idle}]}
  ttfb: {routes: [{upstream: ttfb}]}
YAML
} > "$work/tollgate.yaml"
RUST_LOG=info $BIN -c "$work/tollgate.yaml" >/dev/null & TG_PID=$!; pids+=($TG_PID)
for _ in $(seq 100); do curl -sf "http://127.0.0.1:$ADMIN/health" >/dev/null && break; sleep 0.1; done
NGX_MASTER=$(cat "$work/nginx.pid")
NGX_PIDS="$NGX_MASTER $(pgrep -P "$NGX_MASTER" | tr '\n' ' ')"

# A ~1 KB chat completion body.
write_body "$work/body.json"
write_post_lua "$work/post.lua" "$work/body.json" "$KEY"

url_of() { case $1 in direct) echo "http://127.0.0.1:$MOCK/v1/chat/completions";; nginx) echo "http://127.0.0.1:$NGX/v1/chat/completions";; tollgate) echo "http://127.0.0.1:$TG/v1/chat/completions";; esac; }
pids_of() { case $1 in direct) echo "${pids[0]}";; nginx) echo "$NGX_PIDS";; tollgate) echo "$TG_PID";; esac; }
cpu_ticks() { local t=0; for p in $1; do t=$((t + $(awk '{print $14+$15}' "/proc/$p/stat"))); done; echo $t; }
HZ=$(getconf CLK_TCK)

declare -A rps lat50 lat99 cpu ttfb rss
add() { eval "$1[$2]=\"\${$1[$2]:-} $3\""; }
median() { tr ' ' '\n' | grep -v '^$' | sort -g | awk '{a[NR]=$1} END {print (NR%2 ? a[(NR+1)/2] : (a[NR/2]+a[NR/2+1])/2)}'; }

targets=(direct nginx tollgate)
for round in $(seq "$ROUNDS"); do
  for i in 0 1 2; do
    t=${targets[$(( (i + round) % 3 ))]}
    url=$(url_of $t)
    c0=$(cpu_ticks "$(pids_of $t)")
    out=$(wrk -t1 -c"$CONNS" -d"${DURATION}s" -s "$work/post.lua" "$url")
    c1=$(cpu_ticks "$(pids_of $t)")
    n=$(echo "$out" | awk '/requests in/ {print $1}')
    errs=$(echo "$out" | awk '/Non-2xx/ {print $NF}')
    [ -n "$errs" ] && echo "warning: $t answered $errs non-2xx responses" >&2
    add rps $t "$(echo "$out" | awk '/Requests\/sec/ {print $2}')"
    add cpu $t "$(python3 -c "print(($c1-$c0)/$HZ/$n*10000)")"
    out=$(hey -z "${DURATION}s" -c 10 -q $((RATE / 10)) -m POST -T application/json -H "Authorization: Bearer $KEY" -D "$work/body.json" "$url")
    add lat50 $t "$(echo "$out" | awk '/ 50% in/ {print $3*1000}')"
    add lat99 $t "$(echo "$out" | awk '/ 99% in/ {print $3*1000}')"
    for _ in $(seq 30); do
      case $t in direct) u="http://127.0.0.1:$TTFB/v1/chat/completions";; nginx) u="http://127.0.0.1:$NGX/ttfb/v1/chat/completions";; tollgate) u="http://127.0.0.1:$TG/v1/chat/completions";; esac
      add ttfb $t "$(curl -s -o /dev/null -w '%{time_starttransfer}' -H "Authorization: Bearer $KEY" -H 'content-type: application/json' -d '{"model":"ttfb","stream":true,"messages":[]}' "$u" | awk '{print $1*1000}')"
    done
  done
done

rss_kib() { local t=0; for p in $1; do t=$((t + $(awk '/VmRSS/ {print $2}' "/proc/$p/status"))); done; echo $t; }
for t in nginx tollgate; do
  case $t in nginx) port=$NGX; path=/idle/v1/chat/completions;; tollgate) port=$TG; path=/v1/chat/completions;; esac
  base=$(rss_kib "$(pids_of $t)")
  fifo="$work/hold-$t"; mkfifo "$fifo"
  python3 benches/hold_streams.py "$STREAMS" 127.0.0.1 "$port" "$path" '{"model":"idle","stream":true,"messages":[]}' "Authorization: Bearer $KEY" < "$fifo" > "$work/hold-$t.out" &
  holder=$!
  exec 9>"$fifo"
  for _ in $(seq 600); do grep -q "^open" "$work/hold-$t.out" 2>/dev/null && break; kill -0 $holder 2>/dev/null || break; sleep 0.2; done
  if grep -q "^open" "$work/hold-$t.out"; then
    sleep 1
    held=$(rss_kib "$(pids_of $t)")
    rss[$t]=$(python3 -c "print(round(($held-$base)/$STREAMS, 2))")
  else
    rss[$t]="failed"
    echo "warning: $t could not hold $STREAMS streams: $(tail -1 "$work/hold-$t.out" 2>/dev/null)" >&2
  fi
  exec 9>&-
  wait $holder 2>/dev/null || true
done

m() { echo "${!1}" | median; }
ratio() { python3 -c "
try:
    a, b = float('$1'), float('$2')
    print(f'{a/b:.2f}' if b else 'n/a')
except ValueError:
    print('n/a')"; }
{
  echo "| measure | direct | nginx | Tollgate | Tollgate / nginx | Tollgate / direct |"
  echo "|---|---|---|---|---|---|"
  for metric in rps lat50 lat99 ttfb cpu; do
    d=$(echo "${metric}[direct]" | { read -r k; eval "echo \${$k}"; } | median)
    n=$(echo "${metric}[nginx]" | { read -r k; eval "echo \${$k}"; } | median)
    g=$(echo "${metric}[tollgate]" | { read -r k; eval "echo \${$k}"; } | median)
    case $metric in
      rps) label="throughput, 1 KB chat completions (req/s, $CONNS connections)";;
      lat50) label="p50 latency at $RATE req/s (ms)";;
      lat99) label="p99 latency at $RATE req/s (ms)";;
      ttfb) label="time to first byte of a stream (ms, median of $((30 * ROUNDS)))";;
      cpu) label="CPU seconds per 10,000 requests (the proxy; for direct, the mock upstream)";;
    esac
    echo "| $label | $d | $n | $g | $(ratio "$g" "$n") | $(ratio "$g" "$d") |"
  done
  echo "| added p50 latency over direct (ms) | | $(python3 -c "print(round($(echo "${lat50[nginx]}" | median)-$(echo "${lat50[direct]}" | median),3))") | $(python3 -c "print(round($(echo "${lat50[tollgate]}" | median)-$(echo "${lat50[direct]}" | median),3))") | | |"
  echo "| added p99 latency over direct (ms) | | $(python3 -c "print(round($(echo "${lat99[nginx]}" | median)-$(echo "${lat99[direct]}" | median),3))") | $(python3 -c "print(round($(echo "${lat99[tollgate]}" | median)-$(echo "${lat99[direct]}" | median),3))") | | |"
  echo "| resident memory per idle SSE stream (KiB, $STREAMS streams) | | ${rss[nginx]} | ${rss[tollgate]} | $(ratio "${rss[tollgate]}" "${rss[nginx]}") | |"
  echo
  echo "Machine: $(nproc) cores, $(free -g | awk '/Mem:/ {print $2}') GiB, $(uname -sr); nginx $("$NGINX" -v 2>&1 | sed 's/.*\///'); each proxy one worker; $ROUNDS rounds of ${DURATION}s runs, medians; $(date -u +%Y-%m-%d)."
} > "$work/table.md"
cat "$work/table.md"
# The table replaces the file's first section; the sections after it (other benches'
# figures, each under a "## " heading) are kept.
if [ -f "$OUT" ] && grep -q '^## ' "$OUT"; then
  { cat "$work/table.md"; echo; sed -n '/^## /,$p' "$OUT"; } > "$work/results.md"
  cp "$work/results.md" "$OUT"
else
  cp "$work/table.md" "$OUT"
fi
