#!/usr/bin/env bash
# infra/s3-local.sh - a real S3 endpoint for development, tests and CI, without Docker or internet:
# OpenStack Swift from Debian's archive as a one-node, one-replica store with its s3api middleware
# (SigV4, multipart, ranges) and tempauth (static credentials), on 127.0.0.1 only.
#
#   infra/s3-local.sh start    install if needed (root), configure, start, wait, create the bucket, print env
#   infra/s3-local.sh stop     stop what start started (by pid/process group)
#   infra/s3-local.sh status   exit 0 if the endpoint answers
#   infra/s3-local.sh env      the settings, sourceable: `set -a; . <(infra/s3-local.sh env); set +a`
#
# Two users: a read-write one for A (S3_ACCESS_KEY_ID/S3_SECRET_ACCESS_KEY, the same as AWS_*) and a
# read-only one for B (S3_READ_ACCESS_KEY_ID/S3_READ_SECRET_ACCESS_KEY): Swift's tempauth gives it no
# role, and the bucket's read ACL (X-Container-Read) names it, so it can GET objects and nothing else.
# The read-only user is printed again as DOWNLOAD_AWS_*: `npm start` (infra/start.ts) gives those to
# B as its AWS_*, so B under `npm start` holds no key that can write.
#
# Settings (all optional): S3_LOCAL_DIR (default /var/lib/sfh-s3), S3_LOCAL_PORT (9100; the object,
# container and account servers use S3_LOCAL_PORT+200..+202), S3_LOCAL_BUCKET (sfh-test).
set -euo pipefail
unset PYTHONPATH PYTHONHOME PYTHONSTARTUP PYTHONUSERBASE

DIR=${S3_LOCAL_DIR:-/var/lib/sfh-s3}
PORT=${S3_LOCAL_PORT:-9100}
BUCKET=${S3_LOCAL_BUCKET:-sfh-test}
HOST=127.0.0.1
REGION=us-east-1
ACCOUNT=sfh
WRITER=app WRITER_SECRET=app-secret
READER=download READER_SECRET=download-secret
ENDPOINT="http://$HOST:$PORT"
SERVICES="memcached account container object proxy"
if [ "$(id -u)" = 0 ]; then RUN_AS=swift; else RUN_AS=$(id -un); fi

log() { echo "[s3-local] $*" >&2; }
die() { log "ERROR: $*"; exit 1; }

port_of() {
  case $1 in
    proxy) echo "$PORT" ;; object) echo $((PORT + 200)) ;; container) echo $((PORT + 201)) ;;
    account) echo $((PORT + 202)) ;; memcached) echo $((PORT + 203)) ;;
  esac
}

print_env() {
  cat <<EOF
S3_BUCKET=$BUCKET
S3_FORCE_PATH_STYLE=true
AWS_ENDPOINT_URL_S3=$ENDPOINT
AWS_REGION=$REGION
AWS_ACCESS_KEY_ID=$ACCOUNT:$WRITER
AWS_SECRET_ACCESS_KEY=$WRITER_SECRET
S3_READ_ACCESS_KEY_ID=$ACCOUNT:$READER
S3_READ_SECRET_ACCESS_KEY=$READER_SECRET
DOWNLOAD_AWS_ACCESS_KEY_ID=$ACCOUNT:$READER
DOWNLOAD_AWS_SECRET_ACCESS_KEY=$READER_SECRET
EOF
}

# Every service runs in its own session, so its pid is its process group: stop ends its workers too.
pid_of() { [ -s "$DIR/run/$1.pid" ] && cat "$DIR/run/$1.pid"; }
alive() {
  local pid; pid=$(pid_of "$1") || return 1
  # the command line must still be ours (pid reuse)
  tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null | grep -qF -- "$(cat "$DIR/run/$1.cmd" 2>/dev/null)"
}
start_one() {
  local name=$1; shift
  alive "$name" && return 0
  (exec 3<>"/dev/tcp/$HOST/$(port_of "$name")") 2>/dev/null &&
    die "$HOST:$(port_of "$name") ($name) is taken by another process; choose S3_LOCAL_PORT"
  setsid "$@" >>"$DIR/log/$name.log" 2>&1 </dev/null &
  echo $! >"$DIR/run/$name.pid"
  echo "$*" >"$DIR/run/$name.cmd"
}
stop_all() {
  local name pid
  for name in proxy object container account memcached; do
    if alive "$name"; then
      pid=$(pid_of "$name")
      kill -TERM -- "-$pid" 2>/dev/null || true
      for _ in $(seq 1 50); do [ -d "/proc/$pid" ] || break; sleep 0.2; done
      [ -d "/proc/$pid" ] && kill -KILL -- "-$pid" 2>/dev/null
      log "stopped $name"
    fi
    rm -f "$DIR/run/$name.pid" "$DIR/run/$name.cmd"
  done
}

install_packages() {
  command -v swift-proxy-server >/dev/null && command -v swift-object-server >/dev/null &&
    command -v memcached >/dev/null && command -v curl >/dev/null && return 0
  [ "$(id -u)" = 0 ] || die "as root: apt-get install swift swift-proxy swift-object swift-container swift-account memcached curl"
  log "installing Debian's swift and memcached"
  apt-get update -qq || log "apt-get update reported errors (continuing)"
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
    swift swift-proxy swift-object swift-container swift-account memcached curl >/dev/null
}

write_configs() {
  mkdir -p "$DIR/etc" "$DIR/srv/d1" "$DIR/log" "$DIR/run"
  [ "$RUN_AS" = swift ] && chown -R swift:swift "$DIR/srv"
  # swift reads its hash settings from /etc/swift/swift.conf only; Debian's package ships one
  if [ ! -s /etc/swift/swift.conf ]; then
    mkdir -p /etc/swift
    printf '[swift-hash]\nswift_hash_path_suffix = sfh\nswift_hash_path_prefix = sfh\n\n[storage-policy:0]\nname = Policy-0\ndefault = yes\n' >/etc/swift/swift.conf
  fi
  local common="devices = $DIR/srv
mount_check = false
disable_fallocate = true
bind_ip = $HOST
workers = 0
user = $RUN_AS
swift_dir = $DIR/etc
log_address = /dev/null-no-syslog
disk_chunk_size = 1048576
network_chunk_size = 1048576"
  local kind
  for kind in object container account; do
    printf '[DEFAULT]\n%s\nbind_port = %s\n\n[pipeline:main]\npipeline = %s-server\n\n[app:%s-server]\nuse = egg:swift#%s\n' \
      "$common" "$(port_of $kind)" "$kind" "$kind" "$kind" >"$DIR/etc/$kind-server.conf"
  done
  cat >"$DIR/etc/proxy-server.conf" <<EOF
[DEFAULT]
bind_ip = $HOST
bind_port = $PORT
workers = 1
user = $RUN_AS
swift_dir = $DIR/etc
log_address = /dev/null-no-syslog

[pipeline:main]
pipeline = catch_errors gatekeeper healthcheck proxy-logging cache listing_formats s3api tempauth slo proxy-logging proxy-server

[app:proxy-server]
use = egg:swift#proxy
account_autocreate = true
conn_timeout = 5
node_timeout = 60
# 1 MiB instead of 64 KiB per read and write: Swift is Python, and its proxy then spends ~0.68
# instead of ~0.80 of a core at the same ~290 MiB/s (the S3 part of npm run bench)
object_chunk_size = 1048576
client_chunk_size = 1048576

[filter:s3api]
use = egg:swift#s3api
location = $REGION
s3_acl = false
allow_multipart_uploads = true

[filter:tempauth]
use = egg:swift#tempauth
user_${ACCOUNT}_${WRITER} = $WRITER_SECRET .admin
user_${ACCOUNT}_${READER} = $READER_SECRET

[filter:cache]
use = egg:swift#memcache
memcache_servers = $HOST:$(port_of memcached)

[filter:slo]
use = egg:swift#slo
[filter:catch_errors]
use = egg:swift#catch_errors
[filter:gatekeeper]
use = egg:swift#gatekeeper
[filter:healthcheck]
use = egg:swift#healthcheck
[filter:proxy-logging]
use = egg:swift#proxy_logging
[filter:listing_formats]
use = egg:swift#listing_formats
EOF
  local stamp="$(port_of object) $(port_of container) $(port_of account)"
  if [ "$(cat "$DIR/etc/ring.stamp" 2>/dev/null)" != "$stamp" ]; then
    /usr/bin/python3 - "$DIR/etc" "$HOST" $stamp <<'PY' || die "building the rings failed"
import sys
from swift.common.ring import RingBuilder
etc, ip = sys.argv[1], sys.argv[2]
for name, port in zip(('object', 'container', 'account'), map(int, sys.argv[3:6])):
    b = RingBuilder(6, 1, 1)  # 64 partitions, 1 replica
    b.add_dev({'region': 1, 'zone': 1, 'ip': ip, 'port': port, 'device': 'd1', 'weight': 1.0})
    b.rebalance()
    b.get_ring().save('%s/%s.ring.gz' % (etc, name))
PY
    echo "$stamp" >"$DIR/etc/ring.stamp"
  fi
}

# The bucket, through Swift's own API with a tempauth token: a container whose read ACL names B's user.
ensure_bucket() {
  local headers token url
  headers=$(curl -fsS -m 10 -D - -o /dev/null -H "X-Auth-User: $ACCOUNT:$WRITER" -H "X-Auth-Key: $WRITER_SECRET" "$ENDPOINT/auth/v1.0") ||
    die "tempauth refused the writer's credentials"
  token=$(printf '%s' "$headers" | tr -d '\r' | sed -n 's/^[Xx]-[Aa]uth-[Tt]oken: //p')
  url=$(printf '%s' "$headers" | tr -d '\r' | sed -n 's/^[Xx]-[Ss]torage-[Uu]rl: //p')
  # Right after a first start the account and container servers may still answer 503: retry a while.
  local tries=0
  until curl -fsS -m 10 -o /dev/null -X PUT -H "X-Auth-Token: $token" \
    -H "X-Container-Read: $ACCOUNT:$READER" "$url/$BUCKET" 2>/dev/null; do
    ((++tries < 50)) || die "creating bucket $BUCKET failed"
    sleep 0.2
  done
}

wait_ready() {
  local t0=$SECONDS s
  until curl -fsS -m 2 -o /dev/null "$ENDPOINT/healthcheck" 2>/dev/null &&
    curl -fsS -m 2 -o /dev/null -H "X-Auth-User: $ACCOUNT:$WRITER" -H "X-Auth-Key: $WRITER_SECRET" "$ENDPOINT/auth/v1.0" 2>/dev/null; do
    ((SECONDS - t0 < 60)) || die "no answer on $ENDPOINT after 60 s (logs in $DIR/log)"
    for s in $SERVICES; do alive "$s" || { tail -n 20 "$DIR/log/$s.log" >&2; die "$s exited"; }; done
    sleep 0.2
  done
}

case "${1:-start}" in
  start)
    install_packages
    write_configs
    sum=$(cat "$DIR"/etc/*.conf | md5sum)
    if [ "$(cat "$DIR/run/config.sum" 2>/dev/null)" != "$sum" ]; then stop_all; fi
    mc_user=(); [ "$(id -u)" = 0 ] && mc_user=(-u memcache)
    start_one memcached memcached -l "$HOST" -p "$(port_of memcached)" -U 0 -m 64 "${mc_user[@]}"
    for s in account container object proxy; do
      start_one "$s" "swift-$s-server" "$DIR/etc/$s-server.conf"
    done
    echo "$sum" >"$DIR/run/config.sum"
    wait_ready
    ensure_bucket
    log "ready: $ENDPOINT, bucket $BUCKET"
    print_env
    ;;
  stop) stop_all ;;
  status)
    for s in $SERVICES; do if alive "$s"; then echo "$s: running"; else echo "$s: stopped"; fi; done
    curl -fsS -m 2 -o /dev/null "$ENDPOINT/healthcheck" 2>/dev/null || { echo "$ENDPOINT: down"; exit 1; }
    echo "$ENDPOINT: answering"
    ;;
  env) print_env ;;
  *) echo "usage: infra/s3-local.sh start|stop|status|env" >&2; exit 2 ;;
esac
