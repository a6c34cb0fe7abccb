#!/usr/bin/env bash
# A private PostgreSQL cluster from Debian's packages, on loopback, under .firstmile/services/.
#   deploy/local/postgres.sh start [test|bench]   install if needed, init once, start (idempotent)
#   deploy/local/postgres.sh stop  [test|bench]
#   deploy/local/postgres.sh url   [test|bench]   print the superuser's SQLAlchemy URL
# "test" trades durability for speed (fsync off); "bench" keeps PostgreSQL's durable defaults.
set -euo pipefail

cmd=${1:-start}
name=${2:-test}
root=$(cd "$(dirname "$0")/../.." && pwd)
dir="$root/.firstmile/services/pg-$name"
case "$name" in
  test) port=${FIRSTMILE_TEST_PG_PORT:-55432} ;;
  bench) port=${FIRSTMILE_BENCH_PG_PORT:-55433} ;;
  *) echo "unknown cluster '$name' (test or bench)" >&2; exit 2 ;;
esac

pg_bin() {
  local found
  found=$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n 1 || true)
  [ -n "$found" ] && [ -x "$found/postgres" ] && echo "$found"
}

install_pg() {
  if [ -z "$(pg_bin)" ]; then
    echo "installing PostgreSQL from Debian packages" >&2
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq postgresql >/dev/null
  fi
}

as_pg() {
  if [ "$(id -u)" = 0 ]; then runuser -u postgres -- "$@"; else "$@"; fi
}

case "$cmd" in
  url)
    echo "postgresql+asyncpg://postgres@127.0.0.1:$port/postgres"
    ;;
  start)
    install_pg
    bin=$(pg_bin)
    mkdir -p "$dir"
    if [ "$(id -u)" = 0 ]; then chown -R postgres:postgres "$dir"; fi
    if [ ! -f "$dir/data/PG_VERSION" ]; then
      as_pg "$bin/initdb" -D "$dir/data" -U postgres --auth=trust -E UTF8 --locale=C.UTF-8 >/dev/null
    fi
    if as_pg "$bin/pg_ctl" -D "$dir/data" status >/dev/null 2>&1; then
      echo "postgres ($name) already running on 127.0.0.1:$port" >&2
      exit 0
    fi
    opts="-p $port -k $dir -c listen_addresses=127.0.0.1 -c max_connections=300 -c shared_buffers=256MB"
    if [ "$name" = test ]; then
      opts="$opts -c fsync=off -c synchronous_commit=off -c full_page_writes=off"
    fi
    as_pg "$bin/pg_ctl" -D "$dir/data" -o "$opts" -l "$dir/server.log" -w -t 60 start >/dev/null
    echo "postgres ($name) started on 127.0.0.1:$port" >&2
    ;;
  stop)
    bin=$(pg_bin || true)
    if [ -n "$bin" ] && [ -f "$dir/data/PG_VERSION" ]; then
      as_pg "$bin/pg_ctl" -D "$dir/data" -m fast stop >/dev/null 2>&1 || true
      echo "postgres ($name) stopped" >&2
    fi
    ;;
  *)
    echo "usage: $0 start|stop|url [test|bench]" >&2; exit 2 ;;
esac
