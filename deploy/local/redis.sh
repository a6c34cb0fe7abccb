#!/usr/bin/env bash
# A private Redis server from Debian's packages, on loopback, under .firstmile/services/.
#   deploy/local/redis.sh start [test|bench]   install if needed, start (idempotent)
#   deploy/local/redis.sh stop  [test|bench]
#   deploy/local/redis.sh url   [test|bench]   print the redis:// URL (database 0)
# Neither instance writes to disk (--save "" --appendonly no): the online features it holds are
# rebuilt from the event stream, and the tests want speed. Feature hashes stay compact (listpack) up to
# 1 KB values, as docs/features.md recommends for production. Each runs daemonized with its pid file,
# log and working folder in .firstmile/services/redis-<name>/.
set -euo pipefail

cmd=${1:-start}
name=${2:-test}
root=$(cd "$(dirname "$0")/../.." && pwd)
dir="$root/.firstmile/services/redis-$name"
case "$name" in
  test) port=${FIRSTMILE_TEST_REDIS_PORT:-56379} ;;
  bench) port=${FIRSTMILE_BENCH_REDIS_PORT:-56380} ;;
  *) echo "unknown instance '$name' (test or bench)" >&2; exit 2 ;;
esac

install_redis() {
  if ! command -v redis-server >/dev/null || ! command -v redis-cli >/dev/null; then
    echo "installing Redis from Debian packages" >&2
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq redis-server >/dev/null
  fi
}

running_pid() {
  if [ -f "$dir/redis.pid" ] && kill -0 "$(cat "$dir/redis.pid")" 2>/dev/null; then cat "$dir/redis.pid"; fi
}

case "$cmd" in
  url)
    echo "redis://127.0.0.1:$port/0"
    ;;
  start)
    if [ -n "$(running_pid)" ]; then echo "redis ($name) already running on 127.0.0.1:$port" >&2; exit 0; fi
    install_redis
    mkdir -p "$dir"
    rm -f "$dir/redis.pid"
    redis-server --bind 127.0.0.1 --port "$port" --protected-mode yes \
      --daemonize yes --pidfile "$dir/redis.pid" --logfile "$dir/redis.log" --dir "$dir" \
      --save "" --appendonly no --databases 16 --hash-max-listpack-value 1024
    for _ in $(seq 1 100); do
      if [ "$(redis-cli -h 127.0.0.1 -p "$port" ping 2>/dev/null)" = PONG ]; then
        echo "redis ($name) started on 127.0.0.1:$port" >&2; exit 0
      fi
      sleep 0.1
    done
    echo "redis ($name) did not answer on 127.0.0.1:$port in 10 s; see $dir/redis.log" >&2
    tail -n 20 "$dir/redis.log" >&2 || true
    exit 1
    ;;
  stop)
    pid=$(running_pid)
    if [ -n "$pid" ]; then
      kill "$pid"
      for _ in $(seq 1 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
      kill -9 "$pid" 2>/dev/null || true
      rm -f "$dir/redis.pid"
      echo "redis ($name) stopped" >&2
    fi
    ;;
  *)
    echo "usage: $0 start|stop|url [test|bench]" >&2; exit 2 ;;
esac
