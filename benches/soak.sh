#!/usr/bin/env bash
# Soak: DURATION seconds (default 600) of mixed traffic against a release build, with the
# features users run (auth, limits, metrics, access log): short chat completions, SSE
# streams (a third of them abandoned mid-stream by the client), requests that fail over
# from a dead tier-1 server, and a config reload every 30 s. The gateway's RSS and open
# file descriptors are sampled every 5 s into a CSV. Fails when either grows: the
# highest value of the last minute is compared with the highest of the second minute
# (after warm-up); RSS may not grow by more than 10 % + 4 MiB, fds by more than 16.
#
#   benches/soak.sh                     # 10 minutes
#   DURATION=120 OUT=soak.csv benches/soak.sh
set -euo pipefail
cd "$(dirname "$0")/.."
DURATION=${DURATION:-600}
OUT=${OUT:-}
[ "$DURATION" -ge 120 ] || { echo "soak: DURATION must be at least 120 s" >&2; exit 2; }

# shellcheck source=benches/common.sh
. benches/common.sh
need_tools hey:hey curl:curl
cargo build --release --quiet
BIN=target/release/tollgate

with_workdir

MOCK=$(free_port); TG=$(free_port); ADMIN=$(free_port); DEAD=$(free_port)
KEY=tg-bench-key-0123456789
$BIN mock-upstream --listen 127.0.0.1:$MOCK --stream-events 20 --stream-gap-ms 10 >/dev/null & pids+=($!)
{
  tollgate_features "$work" "$TG" "$ADMIN" "$KEY"
  cat <<YAML
failover: {cooldown: 2s}
upstreams:
  mock: {servers: [{url: "http://127.0.0.1:$MOCK/v1"}]}
  dead: {servers: [{url: "http://127.0.0.1:$DEAD/v1", fail_timeout: 2s}]}
models:
  bench: {routes: [{upstream: mock}]}
  failover:
    routes:
      - {upstream: dead, priority: 1}
      - {upstream: mock, priority: 2}
YAML
} > "$work/tollgate.yaml"
write_body "$work/body.json"
sed 's/"bench"/"failover"/' "$work/body.json" > "$work/failover.json"

$BIN -c "$work/tollgate.yaml" >"$work/tollgate.out" 2>"$work/tollgate.err" & tg=$!; pids+=($tg)
for _ in $(seq 100); do curl -s -o /dev/null "http://127.0.0.1:$ADMIN/health" && break; sleep 0.2; done

post=(-m POST -H "Authorization: Bearer $KEY" -T application/json)
hey -z "${DURATION}s" -c 8 -q 40 "${post[@]}" -D "$work/body.json" \
  "http://127.0.0.1:$TG/v1/chat/completions" > "$work/hey-short.txt" & pids+=($!)
hey -z "${DURATION}s" -c 2 -q 10 "${post[@]}" -D "$work/failover.json" \
  "http://127.0.0.1:$TG/v1/chat/completions" > "$work/hey-failover.txt" & pids+=($!)
python3 benches/soak_streams.py 127.0.0.1 "$TG" "$KEY" "$DURATION" 16 > "$work/streams.txt" & streams=$!; pids+=($streams)

csv="$work/soak.csv"
echo "seconds,rss_kib,fds" > "$csv"
start=$(date +%s); reloads=0
while :; do
  now=$(( $(date +%s) - start ))
  [ "$now" -ge "$DURATION" ] && break
  rss=$(awk '/^VmRSS:/ {print $2}' "/proc/$tg/status")
  fds=$(ls "/proc/$tg/fd" | wc -l)
  echo "$now,$rss,$fds" >> "$csv"
  if [ $((now / 30)) -gt "$reloads" ]; then
    reloads=$((now / 30)); kill -HUP "$tg"
  fi
  sleep 5
done
wait "$streams" || true
sleep 2

echo "short requests:    $(grep -E '^\s+\[[0-9]+\]' "$work/hey-short.txt" | tr -s ' ' | tr '\n' ' ')"
echo "failover requests: $(grep -E '^\s+\[[0-9]+\]' "$work/hey-failover.txt" | tr -s ' ' | tr '\n' ' ')"
echo "streams:           $(cat "$work/streams.txt")"
echo "reloads:           $(grep -c 'reloaded' "$work/tollgate.log" "$work/tollgate.err" | awk -F: '{s+=$2} END {print s}') of $reloads"
[ -n "$OUT" ] && cp "$csv" "$OUT"
python3 - "$csv" <<'PY'
import csv, sys
rows = [(int(r["seconds"]), int(r["rss_kib"]), int(r["fds"])) for r in csv.DictReader(open(sys.argv[1]))]
end = rows[-1][0]
warm = [r for r in rows if 60 <= r[0] < 120]
last = [r for r in rows if r[0] >= end - 60]
rss0, rss1 = max(r[1] for r in warm), max(r[1] for r in last)
fds0, fds1 = max(r[2] for r in warm), max(r[2] for r in last)
print(f"RSS: {rss0} KiB in the second minute, {rss1} KiB in the last ({rss1 / rss0:.2f}x)")
print(f"fds: {fds0} in the second minute, {fds1} in the last")
bad = []
if rss1 > rss0 * 1.10 + 4096:
    bad.append("RSS grew")
if fds1 > fds0 + 16:
    bad.append("fds grew")
if bad:
    print("soak: FAILED: " + ", ".join(bad))
    sys.exit(1)
print("soak: ok")
PY
