# Shared by the benchmark scripts: tools, ports, the request body and the part of
# Tollgate's configuration that turns its features on, so that every benchmark measures
# the same gateway.

as_root() { if [ "$(id -u)" -eq 0 ]; then "$@"; else sudo "$@"; fi; }

# need_tools COMMAND:PACKAGE...: installs from Debian the packages of missing commands.
need_tools() {
  local need=() tool
  for tool in "$@"; do
    command -v "${tool%%:*}" >/dev/null 2>&1 || [ -x "/usr/sbin/${tool%%:*}" ] || need+=("${tool##*:}")
  done
  if [ ${#need[@]} -gt 0 ]; then
    as_root apt-get update -qq
    # shellcheck disable=SC2046
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
      $(printf '%s\n' "${need[@]}" | sort -u) >/dev/null
  fi
}

# with_workdir: sets $work to a new temporary folder and $pids to an empty list; at exit
# every process in $pids (and an nginx that wrote $work/nginx.pid) is stopped and the
# folder removed.
with_workdir() {
  work=$(mktemp -d)
  pids=()
  trap _cleanup_workdir EXIT
}
_cleanup_workdir() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  [ -f "$work/nginx.pid" ] && kill "$(cat "$work/nginx.pid")" 2>/dev/null || true
  sleep 0.3
  rm -rf "$work"
}

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

# write_body FILE: a ~1 KB non-streaming chat completion for model `bench`.
write_body() {
  python3 -c 'import json; print(json.dumps({"model":"bench","messages":[{"role":"system","content":"You are a terse assistant."},{"role":"user","content":("Summarise the following text. "+"lorem ipsum dolor sit amet "*35)[:900]}],"temperature":0.2,"max_tokens":64}), end="")' > "$1"
}

# write_post_lua FILE BODY KEY: a wrk script that POSTs the JSON in BODY with KEY.
write_post_lua() {
  cat > "$1" <<LUA
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
wrk.headers["Authorization"] = "Bearer $3"
local f = io.open("$2", "rb"); wrk.body = f:read("*a"); f:close()
LUA
}

# tollgate_features WORK LISTEN_PORT ADMIN_PORT KEY: the server section, one client key
# with limits, and global and per-IP limits (auth, rate limits, metrics and the access log
# on: what users run). The caller appends upstreams and models.
tollgate_features() {
  cat <<YAML
server:
  listen: ["127.0.0.1:$2"]
  admin_listen: "127.0.0.1:$3"
  threads: 1
  grace_period: 0s
  pid_file: $1/tollgate.pid
  upgrade_sock: $1/tollgate.sock
keys:
  - {name: bench, key: $4, limits: {rpm: 100000000, tpm: 100000000000, concurrency: 100000}}
limits:
  global: {concurrency: 100000}
  per_ip: {rpm: 100000000}
log: {file: $1/tollgate.log}
store: {url: "sqlite://$1/tollgate.db"}
admin: {master_key: bench-master-key}
YAML
}
