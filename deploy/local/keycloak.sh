#!/usr/bin/env bash
# A local Keycloak (the server distribution from Maven Central) in development mode, on loopback,
# under .firstmile/services/.
#   deploy/local/keycloak.sh start  [test|dev]   fetch the distribution once (mvn), start, wait until ready (idempotent)
#   deploy/local/keycloak.sh stop   [test|dev]   stop this instance's process group only
#   deploy/local/keycloak.sh url    [test|dev]   print http://admin:<password>@127.0.0.1:<port> (the bootstrap admin)
#   deploy/local/keycloak.sh status [test|dev]   exit 0 when it answers /health/ready
# The distribution (org.keycloak:keycloak-quarkus-dist, zip) is unpacked once into
# .firstmile/services/keycloak-dist/ (and cached in Maven's ~/.m2). Each instance keeps its H2 database,
# pid file, log and generated bootstrap-admin password in .firstmile/services/keycloak-<name>/.
# `start-dev` runs with the dev-file H2 database, HTTP only, and caches nothing across nodes: never
# a production configuration. Java 17+; about 35 s to ready on 2 cores the first time (the Quarkus
# re-augmentation), less later.
set -euo pipefail

KEYCLOAK_VERSION=${FIRSTMILE_KEYCLOAK_VERSION:-26.7.3}

cmd=${1:-start}
name=${2:-test}
root=$(cd "$(dirname "$0")/../.." && pwd)
services="$root/.firstmile/services"
dist_parent="$services/keycloak-dist"
dist="$dist_parent/keycloak-$KEYCLOAK_VERSION"
dir="$services/keycloak-$name"
case "$name" in
  test) port=${FIRSTMILE_TEST_KEYCLOAK_PORT:-58080} ;;
  dev) port=${FIRSTMILE_DEV_KEYCLOAK_PORT:-8180} ;;
  *) echo "unknown instance '$name' (test or dev)" >&2; exit 2 ;;
esac
management_port=$((port + 1))

fetch_dist() {
  if [ -f "$dist/.complete" ]; then return; fi
  command -v mvn >/dev/null || { echo "mvn is needed to fetch Keycloak (apt-get install maven)" >&2; exit 1; }
  command -v unzip >/dev/null || { echo "unzip is needed to unpack Keycloak (apt-get install unzip)" >&2; exit 1; }
  echo "fetching Keycloak $KEYCLOAK_VERSION (org.keycloak:keycloak-quarkus-dist) from Maven Central" >&2
  local tmp="$dist_parent/.tmp-$$"
  rm -rf "$tmp" && mkdir -p "$tmp"
  # No project needed: dependency:copy resolves the one artifact into the local repository and copies it.
  (cd "$tmp" && mvn -q dependency:copy -Dartifact="org.keycloak:keycloak-quarkus-dist:$KEYCLOAK_VERSION:zip" \
    -DoutputDirectory="$tmp" >&2)
  unzip -q "$tmp/keycloak-quarkus-dist-$KEYCLOAK_VERSION.zip" -d "$tmp"
  rm -rf "$dist" && mv "$tmp/keycloak-$KEYCLOAK_VERSION" "$dist" && rm -rf "$tmp"
  echo "$KEYCLOAK_VERSION" > "$dist/.complete"
}

# The bootstrap admin's password: generated once per instance, kept beside its database (0600).
admin_password() {
  mkdir -p "$dir"
  if [ ! -s "$dir/admin-password" ]; then
    (umask 077 && head -c 18 /dev/urandom | base64 | tr -d '/+=' > "$dir/admin-password")
  fi
  cat "$dir/admin-password"
}

ready() { curl -sf -o /dev/null --max-time 2 "http://127.0.0.1:$management_port/health/ready"; }

running_pid() {
  if [ -f "$dir/keycloak.pid" ] && kill -0 "$(cat "$dir/keycloak.pid")" 2>/dev/null; then cat "$dir/keycloak.pid"; fi
}

case "$cmd" in
  url)
    echo "http://admin:$(admin_password)@127.0.0.1:$port"
    ;;
  status)
    if [ -n "$(running_pid)" ] && ready; then echo "keycloak ($name) ready on 127.0.0.1:$port" >&2; exit 0; fi
    echo "keycloak ($name) is not running or not ready" >&2; exit 1
    ;;
  start)
    if [ -n "$(running_pid)" ]; then
      echo "keycloak ($name) already running on 127.0.0.1:$port" >&2
    else
      command -v java >/dev/null || { echo "Java 17+ is needed for Keycloak" >&2; exit 1; }
      fetch_dist
      password=$(admin_password)
      mkdir -p "$dir/data"
      started=$(date +%s)
      # setsid: its own session and process group (kc.sh and the JVM), so `stop` signals exactly these.
      # The bootstrap admin is created only while the master realm has none (the first start).
      KC_BOOTSTRAP_ADMIN_USERNAME=admin KC_BOOTSTRAP_ADMIN_PASSWORD="$password" \
        JAVA_OPTS_KC_HEAP="${FIRSTMILE_KEYCLOAK_HEAP:--Xms64m -Xmx512m}" \
        setsid "$dist/bin/kc.sh" start-dev \
          --http-host=127.0.0.1 --http-port="$port" \
          --http-management-port="$management_port" --health-enabled=true \
          --db=dev-file --db-url="jdbc:h2:file:$dir/data/keycloakdb;NON_KEYWORDS=VALUE" \
          </dev/null >"$dir/keycloak.log" 2>&1 &
      echo $! > "$dir/keycloak.pid"
    fi
    for _ in $(seq 1 360); do
      if ready; then
        if [ -n "${started:-}" ]; then
          echo "keycloak ($name) ready on 127.0.0.1:$port after $(( $(date +%s) - started )) s" >&2
        fi
        exit 0
      fi
      if [ -z "$(running_pid)" ]; then
        echo "keycloak ($name) exited; see $dir/keycloak.log" >&2; tail -n 30 "$dir/keycloak.log" >&2 || true; exit 1
      fi
      sleep 0.5
    done
    echo "keycloak ($name) not ready on 127.0.0.1:$management_port in 180 s; see $dir/keycloak.log" >&2; exit 1
    ;;
  stop)
    pid=$(running_pid)
    if [ -n "$pid" ]; then
      # kc.sh forwards TERM to its JVM; the group holds only what this script started.
      kill -TERM -- "-$pid" 2>/dev/null || kill -TERM "$pid"
      for _ in $(seq 1 60); do kill -0 "$pid" 2>/dev/null || break; sleep 0.5; done
      kill -KILL -- "-$pid" 2>/dev/null || true
      rm -f "$dir/keycloak.pid"
      echo "keycloak ($name) stopped" >&2
    fi
    ;;
  *)
    echo "usage: $0 start|stop|url|status [test|dev]" >&2; exit 2 ;;
esac
