#!/usr/bin/env bash
# A local cluster for development: two A and two B from this checkout, on the local Postgres
# and Redis, with Debian's nginx as the load balancer in front of each pair.
#
#   infra/local-cluster.sh up       start it; waits until everything is ready, prints the URLs
#   infra/local-cluster.sh status   what runs
#   infra/local-cluster.sh logs     the last lines of every log
#   infra/local-cluster.sh render   only write the nginx config (CLUSTER_DIR/nginx/nginx.conf)
#   infra/local-cluster.sh down     stop it cleanly (SIGTERM, wait; nginx: graceful QUIT)
#
# Environment (defaults in brackets):
#   CLUSTER_DIR [./data/cluster]   pids, logs, nginx config, generated secrets, shared storage
#   DATABASE_URL [postgres://postgres@127.0.0.1:5432/postgres]   shared by the A replicas
#   REDIS_URL [redis://127.0.0.1:6379]                           shared by the B replicas
#   A_PORTS ["3100 3101"]  B_PORTS ["3200 3201"]   replica ports (spaces or commas)
#   A_LB_PORT [8080]  B_LB_PORT [8081]             nginx: A's and B's public origins
#   STORAGE_DIR [CLUSTER_DIR/files]   SESSION_SECRET, KEY_ENCRYPTION_KEY [generated, kept]
#   STORAGE [local]   s3: the bytes in the bucket of infra/s3-local.sh (started if needed) under
#                     S3_PREFIX [cluster/], A with read-write and B with read-only credentials,
#                     no shared volume
#   REDIS_KEY_PREFIX [dl:jti:]  JWKS_REFRESH_SECONDS [10]  LOG_LEVEL [info]
#   READY_TIMEOUT [90] seconds   STOP_TIMEOUT [45] seconds (above SHUTDOWN_GRACE_SECONDS)
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
CLUSTER_DIR="${CLUSTER_DIR:-$ROOT/data/cluster}"
mkdir -p "$CLUSTER_DIR"
CLUSTER_DIR="$(cd "$CLUSTER_DIR" && pwd)"
cd "$ROOT"

A_PORTS="${A_PORTS:-3100 3101}"
B_PORTS="${B_PORTS:-3200 3201}"
read -r -a A_PORT_LIST <<<"${A_PORTS//,/ }"
read -r -a B_PORT_LIST <<<"${B_PORTS//,/ }"
A_LB_PORT="${A_LB_PORT:-8080}"
B_LB_PORT="${B_LB_PORT:-8081}"
DATABASE_URL="${DATABASE_URL:-postgres://postgres@127.0.0.1:5432/postgres}"
REDIS_URL="${REDIS_URL:-redis://127.0.0.1:6379}"
REDIS_KEY_PREFIX="${REDIS_KEY_PREFIX:-dl:jti:}"
STORAGE_DIR="${STORAGE_DIR:-$CLUSTER_DIR/files}"
STORAGE="${STORAGE:-local}"
S3_PREFIX="${S3_PREFIX:-cluster/}"
JWKS_REFRESH_SECONDS="${JWKS_REFRESH_SECONDS:-10}"
LOG_LEVEL="${LOG_LEVEL:-info}"
READY_TIMEOUT="${READY_TIMEOUT:-90}"
STOP_TIMEOUT="${STOP_TIMEOUT:-45}"

CLEAN_UP_ON_EXIT=0
RUN="$CLUSTER_DIR/run"
LOGS="$CLUSTER_DIR/logs"
NGINX_DIR="$CLUSTER_DIR/nginx"
NGINX_CONF="$NGINX_DIR/nginx.conf"
NGINX_PID="$NGINX_DIR/nginx.pid"
APP_URL="http://localhost:$A_LB_PORT"
DOWNLOAD_URL="http://localhost:$B_LB_PORT"

say() { printf '%s\n' "$*"; }
die() {
  printf 'local-cluster: %s\n' "$*" >&2
  exit 1
}

# 0 when the URL answers 2xx within 2 s (node is there anyway; curl may not be).
http_ok() {
  node -e 'fetch(process.argv[1], { signal: AbortSignal.timeout(2000) }).then((r) => process.exit(r.ok ? 0 : 1), () => process.exit(1))' "$1"
}

# 0 while the process runs (an exited process nobody has reaped yet does not count).
running() {
  local stat
  stat="$(cat "/proc/$1/stat" 2>/dev/null)" || return 1
  stat="${stat##*) }"
  [[ "${stat%% *}" != Z ]]
}

# The pid in a pid file, if that process still runs (and is ours: a server or nginx).
live_pid() {
  local file=$1 pid
  [[ -s "$file" ]] || return 1
  pid="$(<"$file")"
  [[ "$pid" =~ ^[0-9]+$ ]] && running "$pid" || return 1
  grep -qaE 'server\.(ts|mjs)|nginx' "/proc/$pid/cmdline" 2>/dev/null || return 1
  printf '%s' "$pid"
}

nginx_bin() {
  command -v nginx 2>/dev/null || { [[ -x /usr/sbin/nginx ]] && printf '/usr/sbin/nginx'; } || return 1
}

ensure_nginx() {
  nginx_bin >/dev/null && return 0
  if [[ "$(id -u)" -eq 0 ]] && command -v apt-get >/dev/null; then
    say "nginx is not installed: installing Debian's nginx (apt-get install -y nginx)"
    DEBIAN_FRONTEND=noninteractive apt-get install -y nginx >"$LOGS/apt-nginx.log" 2>&1 ||
      { apt-get update >>"$LOGS/apt-nginx.log" 2>&1 &&
        DEBIAN_FRONTEND=noninteractive apt-get install -y nginx >>"$LOGS/apt-nginx.log" 2>&1; } ||
      die "installing nginx failed; see $LOGS/apt-nginx.log"
    nginx_bin >/dev/null || die "nginx still not found after installing it"
  else
    die "nginx is not installed. Install Debian's nginx (sudo apt-get install -y nginx) and run this again."
  fi
}

# A secret kept in CLUSTER_DIR: generated once (32 random bytes, base64url), reused afterwards.
kept_secret() {
  local file="$CLUSTER_DIR/$1"
  if [[ ! -s "$file" ]]; then
    (umask 077 && node -e 'process.stdout.write(require("node:crypto").randomBytes(32).toString("base64url"))' >"$file")
  fi
  cat "$file"
}

render_nginx_conf() {
  local a_up="" b_up="" port ipv6="#" text
  for port in "${A_PORT_LIST[@]}"; do a_up+="        server 127.0.0.1:$port max_fails=1 fail_timeout=5s;"$'\n'; done
  for port in "${B_PORT_LIST[@]}"; do b_up+="        server 127.0.0.1:$port max_fails=1 fail_timeout=5s;"$'\n'; done
  # IPv6 loopback present: listen on ::1 too, since browsers may try localhost as ::1 first.
  grep -qE '^0{31}1 .* lo$' /proc/net/if_inet6 2>/dev/null && ipv6=""
  text="$(<"$ROOT/infra/nginx/cluster.conf.template")"
  text="${text//@CLUSTER_DIR@/$CLUSTER_DIR}"
  text="${text//@A_LB_PORT@/$A_LB_PORT}"
  text="${text//@B_LB_PORT@/$B_LB_PORT}"
  text="${text//@A_UPSTREAMS@/${a_up%$'\n'}}"
  text="${text//@B_UPSTREAMS@/${b_up%$'\n'}}"
  text="${text//@IPV6@/$ipv6}"
  printf "# Generated by infra/local-cluster.sh from infra/nginx/cluster.conf.template.\n%s\n" "$text" >"$NGINX_CONF"
}

nginx_cmd() {
  "$(nginx_bin)" -p "$NGINX_DIR/" -e "$LOGS/nginx-error.log" -c "$NGINX_CONF" "$@"
}

# start_server NAME ENTRY VAR=value...: one replica, detached from this shell's process group
# (so Ctrl-C here does not reach it), output appended to its log. Its environment is VAR=value...
# and what node needs, nothing else from this shell: a B must not inherit an exported
# SESSION_SECRET or KEY_ENCRYPTION_KEY.
start_server() {
  local name=$1 entry=$2
  shift 2
  local args=("$entry") runtime=(PATH="$PATH" HOME="$HOME")
  [[ $entry == *.ts ]] && args=(--import tsx "$entry")
  [[ -n ${TZ:-} ]] && runtime+=(TZ="$TZ")
  [[ -n ${LANG:-} ]] && runtime+=(LANG="$LANG")
  env -i "${runtime[@]}" "$@" SFH_CLUSTER_DIR="$CLUSTER_DIR" setsid node "${args[@]}" </dev/null >>"$LOGS/$name.log" 2>&1 &
  printf '%s\n' "$!" >"$RUN/$name.pid"
}

# wait_ready NAME URL: until URL answers 2xx; fails early when the process died.
wait_ready() {
  local name=$1 url=$2 deadline=$((SECONDS + READY_TIMEOUT)) pidfile="$RUN/$1.pid"
  until http_ok "$url"; do
    if [[ -e "$pidfile" ]] && ! live_pid "$pidfile" >/dev/null; then
      say "$name exited; the end of $LOGS/$name.log:" >&2
      tail -n 20 "$LOGS/$name.log" >&2 || true
      return 1
    fi
    if ((SECONDS >= deadline)); then
      say "$name is not ready at $url after ${READY_TIMEOUT}s" >&2
      if [[ -e "$LOGS/$name.log" ]]; then
        say "the end of $LOGS/$name.log:" >&2
        tail -n 10 "$LOGS/$name.log" >&2 || true
      fi
      return 1
    fi
    sleep 0.25
  done
}

# Stops what the pid files name: nginx gracefully (QUIT), the servers with SIGTERM (they
# drain), then waits; whatever still runs after STOP_TIMEOUT gets SIGKILL.
stop_all() {
  local file pid pids=() names=() i deadline
  if pid="$(live_pid "$NGINX_PID")"; then
    kill -QUIT "$pid" 2>/dev/null || true
    pids+=("$pid")
    names+=(nginx)
  fi
  for file in "$RUN"/*.pid; do
    [[ -e "$file" ]] || continue
    if pid="$(live_pid "$file")"; then
      kill -TERM "$pid" 2>/dev/null || true
      pids+=("$pid")
      names+=("$(basename "$file" .pid)")
    fi
  done
  deadline=$((SECONDS + STOP_TIMEOUT))
  for i in "${!pids[@]}"; do
    while running "${pids[$i]}"; do
      if ((SECONDS >= deadline)); then
        say "${names[$i]} (pid ${pids[$i]}) did not stop within ${STOP_TIMEOUT}s: SIGKILL" >&2
        kill -KILL "${pids[$i]}" 2>/dev/null || true
        break
      fi
      sleep 0.1
    done
    say "stopped ${names[$i]} (pid ${pids[$i]})"
  done
  rm -f "$RUN"/*.pid "$NGINX_PID"
}

cmd_up() {
  command -v node >/dev/null || die "node is not installed"
  [[ -d "$ROOT/node_modules/tsx" ]] || die "dependencies are missing: run npm ci in $ROOT first"
  (cd "$ROOT" && npm run --silent build) || die "npm run build (B's bundle) failed"
  mkdir -p "$RUN" "$LOGS" "$NGINX_DIR/tmp"
  local file
  for file in "$RUN"/*.pid "$NGINX_PID"; do
    if [[ -e "$file" ]] && live_pid "$file" >/dev/null; then
      die "the cluster in $CLUSTER_DIR is already running (infra/local-cluster.sh status; down to stop it)"
    fi
  done
  rm -f "$RUN"/*.pid
  ensure_nginx

  local session_secret="${SESSION_SECRET:-$(kept_secret session-secret)}"
  local kek="${KEY_ENCRYPTION_KEY:-$(kept_secret key-encryption-key)}"
  # Where the bytes are: a volume every replica mounts, or a bucket they share and nothing else.
  local storage=() app_storage=() download_storage=()
  case "$STORAGE" in
    local)
      mkdir -p "$STORAGE_DIR"
      storage=(STORAGE_DIR="$STORAGE_DIR")
      ;;
    s3)
      local s3env
      s3env="$(bash "$ROOT/infra/s3-local.sh" start)" || die "infra/s3-local.sh start failed"
      s3() { sed -n "s/^$1=//p" <<<"$s3env"; }
      storage=(S3_BUCKET="$(s3 S3_BUCKET)" S3_PREFIX="$S3_PREFIX" S3_FORCE_PATH_STYLE=true
        AWS_ENDPOINT_URL_S3="$(s3 AWS_ENDPOINT_URL_S3)" AWS_REGION="$(s3 AWS_REGION)")
      app_storage=(AWS_ACCESS_KEY_ID="$(s3 AWS_ACCESS_KEY_ID)" AWS_SECRET_ACCESS_KEY="$(s3 AWS_SECRET_ACCESS_KEY)")
      download_storage=(AWS_ACCESS_KEY_ID="$(s3 S3_READ_ACCESS_KEY_ID)"
        AWS_SECRET_ACCESS_KEY="$(s3 S3_READ_SECRET_ACCESS_KEY)")
      ;;
    *) die "STORAGE is local or s3, not $STORAGE" ;;
  esac
  local shared=(
    NODE_ENV=development
    LOG_LEVEL="$LOG_LEVEL"
    "${storage[@]}"
    APP_PUBLIC_URL="$APP_URL"
    DOWNLOAD_PUBLIC_URL="$DOWNLOAD_URL"
    JWKS_REFRESH_SECONDS="$JWKS_REFRESH_SECONDS"
  )
  local app=(
    "${shared[@]}"
    DATABASE_URL="$DATABASE_URL"
    SESSION_SECRET="$session_secret"
    KEY_ENCRYPTION_KEY="$kek"
    TRUST_PROXY=loopback
    "${app_storage[@]}"
  )
  local download=(
    "${shared[@]}"
    REDIS_URL="$REDIS_URL"
    REDIS_KEY_PREFIX="$REDIS_KEY_PREFIX"
    JWKS_URL="http://127.0.0.1:$A_LB_PORT/.well-known/jwks.json"
    "${download_storage[@]}"
  )

  # Anything failing from here on (or Ctrl-C) takes down what was started.
  CLEAN_UP_ON_EXIT=1
  trap 'if ((CLEAN_UP_ON_EXIT)); then stop_all >/dev/null; fi' EXIT
  trap 'exit 130' INT TERM
  local port
  for port in "${A_PORT_LIST[@]}"; do
    start_server "a-$port" apps/app-server/src/server.ts "${app[@]}" \
      APP_PORT="$port" DATA_DIR="$CLUSTER_DIR/a-$port"
    # The first replica migrates the schema before the others start.
    [[ "$port" != "${A_PORT_LIST[0]}" ]] || wait_ready "a-$port" "http://127.0.0.1:$port/readyz" || die "A did not start"
  done

  render_nginx_conf
  nginx_cmd -t -q || die "nginx rejected $NGINX_CONF"
  nginx_cmd || die "nginx did not start; see $LOGS/nginx-error.log"

  for port in "${B_PORT_LIST[@]}"; do
    start_server "b-$port" apps/download-server/dist/server.mjs "${download[@]}" \
      DOWNLOAD_PORT="$port" DATA_DIR="$CLUSTER_DIR/b-$port"
  done

  for port in "${A_PORT_LIST[@]}"; do
    wait_ready "a-$port" "http://127.0.0.1:$port/readyz" || die "A did not start"
  done
  for port in "${B_PORT_LIST[@]}"; do
    wait_ready "b-$port" "http://127.0.0.1:$port/readyz" || die "B did not start"
  done
  wait_ready nginx "http://127.0.0.1:$A_LB_PORT/readyz" || die "nginx does not reach A"
  wait_ready nginx "http://127.0.0.1:$B_LB_PORT/readyz" || die "nginx does not reach B"
  CLEAN_UP_ON_EXIT=0
  trap - INT TERM

  say "local cluster is up (${#A_PORT_LIST[@]} A, ${#B_PORT_LIST[@]} B, nginx; $STORAGE storage; state in $CLUSTER_DIR)"
  say "  app (A):      $APP_URL"
  say "  download (B): $DOWNLOAD_URL"
  say "stop it with: infra/local-cluster.sh down"
}

cmd_status() {
  local file name pid port running=0 total=0
  for file in "$RUN"/*.pid "$NGINX_PID"; do
    [[ -e "$file" ]] || continue
    total=$((total + 1))
    name="$(basename "$file" .pid)"
    if pid="$(live_pid "$file")"; then
      running=$((running + 1))
      port="${name#*-}"
      if [[ "$name" == nginx ]]; then
        say "$(printf '%-8s pid %-8s running' "$name" "$pid")"
      elif http_ok "http://127.0.0.1:$port/readyz"; then
        say "$(printf '%-8s pid %-8s running  ready on :%s' "$name" "$pid" "$port")"
      else
        say "$(printf '%-8s pid %-8s running  NOT ready on :%s' "$name" "$pid" "$port")"
      fi
    else
      say "$(printf '%-8s %-12s stopped' "$name" '')"
    fi
  done
  if ((total == 0)); then
    say "not running (no cluster in $CLUSTER_DIR)"
    return 3
  fi
  if live_pid "$NGINX_PID" >/dev/null; then
    say "  app (A):      $APP_URL"
    say "  download (B): $DOWNLOAD_URL"
  fi
  ((running == total)) || return 1
}

cmd_logs() {
  local file
  for file in "$LOGS"/*.log; do
    [[ -e "$file" ]] || continue
    say "==> $file <=="
    tail -n "${LINES:-20}" "$file"
  done
}

cmd_down() {
  if ! compgen -G "$RUN/*.pid" >/dev/null && [[ ! -e "$NGINX_PID" ]]; then
    say "not running (no cluster in $CLUSTER_DIR)"
    return 0
  fi
  stop_all
  say "local cluster is down (logs and secrets stay in $CLUSTER_DIR)"
}

case "${1:-}" in
up) cmd_up ;;
down) cmd_down ;;
status) cmd_status ;;
logs) cmd_logs ;;
render)
  mkdir -p "$NGINX_DIR/tmp" "$LOGS"
  render_nginx_conf
  say "$NGINX_CONF"
  ;;
*)
  say "usage: infra/local-cluster.sh up|down|status|logs|render" >&2
  exit 2
  ;;
esac
