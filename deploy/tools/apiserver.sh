#!/usr/bin/env bash
# A throwaway Kubernetes API server (etcd + kube-apiserver, no controllers, no nodes) on 127.0.0.1, for
# `kubectl apply --dry-run=server`: admission, defaulting and the server's own validation of the chart.
#   deploy/tools/apiserver.sh start        start it (idempotent) and wait until /readyz is ok
#   deploy/tools/apiserver.sh stop         stop it and remove its state
#   deploy/tools/apiserver.sh url          its https URL
#   deploy/tools/apiserver.sh kubeconfig   the path of a kubeconfig for it (static admin token)
#   deploy/tools/apiserver.sh status       exit 0 when it is up and ready
# State (certificates, etcd data, logs, kubeconfig) lives in $FIRSTMILE_APISERVER_STATE
# (default ${TMPDIR:-/tmp}/firstmile-apiserver-$UID). Both processes run under `timeout`: they stop by
# themselves after $FIRSTMILE_APISERVER_TTL seconds (default 1800) even if nobody calls stop.
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
STATE=${FIRSTMILE_APISERVER_STATE:-${TMPDIR:-/tmp}/firstmile-apiserver-$(id -u)}
TTL=${FIRSTMILE_APISERVER_TTL:-1800}
READY_TIMEOUT=${FIRSTMILE_APISERVER_READY_TIMEOUT:-180}

log() { printf '[apiserver] %s\n' "$*" >&2; }
die() { printf '[apiserver] ERROR: %s\n' "$*" >&2; exit 1; }

alive() { [ -f "$STATE/$1.pid" ] && kill -0 "$(cat "$STATE/$1.pid")" 2>/dev/null; }

url() { echo "https://127.0.0.1:$(cat "$STATE/apiserver.port")"; }

ready() {
  [ -f "$STATE/apiserver.port" ] && alive apiserver && alive etcd &&
    curl -sf --max-time 5 --cacert "$STATE/pki/ca.crt" -H "Authorization: Bearer $(cat "$STATE/token")" \
      "$(url)/readyz" >/dev/null 2>&1
}

free_port() {
  python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

make_pki() {
  local pki=$STATE/pki
  mkdir -p "$pki"
  openssl req -x509 -newkey rsa:2048 -nodes -days 2 -subj "/CN=firstmile-check-ca" \
    -keyout "$pki/ca.key" -out "$pki/ca.crt" 2>/dev/null
  openssl req -newkey rsa:2048 -nodes -subj "/CN=kube-apiserver" \
    -keyout "$pki/apiserver.key" -out "$pki/apiserver.csr" 2>/dev/null
  printf 'subjectAltName=IP:127.0.0.1,DNS:localhost,DNS:kubernetes,DNS:kubernetes.default,IP:10.96.0.1\n' \
    >"$pki/apiserver.ext"
  openssl x509 -req -in "$pki/apiserver.csr" -CA "$pki/ca.crt" -CAkey "$pki/ca.key" -CAcreateserial \
    -days 2 -extfile "$pki/apiserver.ext" -out "$pki/apiserver.crt" 2>/dev/null
  # The service-account token signer; nothing here uses tokens it issues, but the server requires one.
  openssl genrsa -out "$pki/sa.key" 2048 2>/dev/null
  openssl rsa -in "$pki/sa.key" -pubout -out "$pki/sa.pub" 2>/dev/null
  openssl rand -hex 24 >"$STATE/token"
  printf '%s,firstmile-check,firstmile-check,system:masters\n' "$(cat "$STATE/token")" >"$pki/tokens.csv"
  chmod 600 "$pki"/*.key "$pki/tokens.csv" "$STATE/token"
}

write_kubeconfig() {
  cat >"$STATE/kubeconfig" <<EOF
apiVersion: v1
kind: Config
clusters:
- name: firstmile-check
  cluster:
    server: $(url)
    certificate-authority: $STATE/pki/ca.crt
users:
- name: firstmile-check
  user:
    token: $(cat "$STATE/token")
contexts:
- name: firstmile-check
  context: {cluster: firstmile-check, user: firstmile-check}
current-context: firstmile-check
EOF
  chmod 600 "$STATE/kubeconfig"
}

# Each server runs in its own session (setsid), whose id is the recorded pid: killing the group takes
# `timeout` and the server together. SIGKILL, no graceful shutdown: the state is thrown away anyway, and
# a kube-apiserver told to stop waits on its storage for a long while.
stop_processes() {
  local p
  for p in apiserver etcd; do
    if alive "$p"; then kill -KILL -- "-$(cat "$STATE/$p.pid")" 2>/dev/null || true; fi
  done
  for p in apiserver etcd; do
    local i
    for i in $(seq 1 50); do alive "$p" || break; sleep 0.1; done
  done
}

start() {
  if ready; then return 0; fi
  stop_processes
  rm -rf "$STATE" && mkdir -p "$STATE" && chmod 700 "$STATE"
  local etcd apiserver
  "$here/install.sh" etcd kube-apiserver
  etcd=$("$here/install.sh" path etcd)
  apiserver=$("$here/install.sh" path kube-apiserver)
  make_pki
  local etcd_port peer_port api_port
  etcd_port=$(free_port) peer_port=$(free_port) api_port=$(free_port)
  echo "$api_port" >"$STATE/apiserver.port"

  # Plain HTTP between the two is fine: both listen on loopback only and live for minutes.
  # --unsafe-no-fsync: the data is thrown away, durability only costs time.
  # 8>&-: the servers must not inherit the start/stop lock, or they would hold it for their lifetime.
  setsid timeout --kill-after 20 "$TTL" "$etcd" --name check --data-dir "$STATE/etcd" \
    --listen-client-urls "http://127.0.0.1:$etcd_port" --advertise-client-urls "http://127.0.0.1:$etcd_port" \
    --listen-peer-urls "http://127.0.0.1:$peer_port" --initial-advertise-peer-urls "http://127.0.0.1:$peer_port" \
    --initial-cluster "check=http://127.0.0.1:$peer_port" --listen-metrics-urls "" \
    --unsafe-no-fsync --log-level warn >"$STATE/etcd.log" 2>&1 </dev/null 8>&- &
  echo $! >"$STATE/etcd.pid"

  local pki=$STATE/pki
  # --endpoint-reconciler-type none: the reconciler refuses a loopback advertise address, and only keeps
  # the in-cluster `kubernetes` Service's endpoints, which nothing here uses.
  setsid timeout --kill-after 20 "$TTL" "$apiserver" \
    --bind-address 127.0.0.1 --advertise-address 127.0.0.1 --secure-port "$api_port" \
    --etcd-servers "http://127.0.0.1:$etcd_port" \
    --tls-cert-file "$pki/apiserver.crt" --tls-private-key-file "$pki/apiserver.key" \
    --client-ca-file "$pki/ca.crt" --token-auth-file "$pki/tokens.csv" --authorization-mode RBAC \
    --service-account-issuer https://kubernetes.default.svc.cluster.local \
    --service-account-key-file "$pki/sa.pub" --service-account-signing-key-file "$pki/sa.key" \
    --service-cluster-ip-range 10.96.0.0/16 --cert-dir "$pki" --profiling=false \
    --endpoint-reconciler-type none \
    >"$STATE/apiserver.log" 2>&1 </dev/null 8>&- &
  echo $! >"$STATE/apiserver.pid"
  write_kubeconfig

  local waited=0 failed=
  until ready; do
    if ! alive etcd; then failed="etcd exited (log: $STATE/etcd.log)"; fi
    if ! alive apiserver; then failed="kube-apiserver exited (log: $STATE/apiserver.log)"; fi
    if [ "$waited" -ge "$READY_TIMEOUT" ]; then failed="kube-apiserver not ready after ${READY_TIMEOUT}s"; fi
    if [ -n "$failed" ]; then
      tail -5 "$STATE/etcd.log" "$STATE/apiserver.log" >&2
      # The other one must not outlive a failed start.
      stop_processes
      die "$failed"
    fi
    sleep 1
    waited=$((waited + 1))
  done
  log "ready at $(url) after ${waited}s (stops by itself within ${TTL}s; kubeconfig $STATE/kubeconfig)"
}

stop() {
  [ -d "$STATE" ] || return 0
  stop_processes
  rm -rf "$STATE"
}

cmd=${1:-}
mkdir -p "$(dirname "$STATE")"
case "$cmd" in
  start | stop)
    # One start or stop at a time: two checks starting together share one server.
    exec 8>"$STATE.lock"
    flock 8
    "$cmd"
    ;;
  url) ready || die "not running: $0 start"; url ;;
  kubeconfig) ready || die "not running: $0 start"; echo "$STATE/kubeconfig" ;;
  status) ready || exit 1 ;;
  *) sed -n '2,11p' "$0" | sed 's/^# \{0,1\}//' >&2; exit 2 ;;
esac
