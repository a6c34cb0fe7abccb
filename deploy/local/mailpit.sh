#!/usr/bin/env bash
# Mailpit, a real SMTP server with an HTTP API to read what it received, for the tests and `make run`.
#   deploy/local/mailpit.sh install                 build it once with `go install` into the tools cache (skipped when present)
#   deploy/local/mailpit.sh start [test|bench|run]  start on loopback (idempotent)
#   deploy/local/mailpit.sh stop  [test|bench|run]
#   deploy/local/mailpit.sh url   [test|bench|run]  print the SMTP URL (smtp://127.0.0.1:PORT)
#   deploy/local/mailpit.sh api   [test|bench|run]  print the HTTP API's base URL (http://127.0.0.1:PORT)
#   deploy/local/mailpit.sh path                    print the binary
# Mailpit is a Go module (github.com/axllent/mailpit), built from the Go module proxy; its messages live in a
# SQLite file under .firstmile/services/mailpit-<name>/ and are gone with the instance. Chaos (scripted SMTP
# errors through PUT /api/v1/chaos) is on, so tests can make it answer 4xx and 5xx. Ports sit above the
# ephemeral range (32768-60999), so no client socket of a running suite can hold them.
set -euo pipefail

cmd=${1:-start}
name=${2:-test}
root=$(cd "$(dirname "$0")/../.." && pwd)
version=${MAILPIT_VERSION:-v1.33.1}
tools=${FIRSTMILE_TOOLS:-$HOME/.cache/firstmile-tools}
home="$tools/mailpit-$version"
bin="$home/bin/mailpit"
dir="$root/.firstmile/services/mailpit-$name"
case "$name" in
  test) smtp=${FIRSTMILE_TEST_MAILPIT_SMTP_PORT:-64525}; http=${FIRSTMILE_TEST_MAILPIT_HTTP_PORT:-64526} ;;
  bench) smtp=${FIRSTMILE_BENCH_MAILPIT_SMTP_PORT:-64527}; http=${FIRSTMILE_BENCH_MAILPIT_HTTP_PORT:-64528} ;;
  run) smtp=${FIRSTMILE_RUN_MAILPIT_SMTP_PORT:-64529}; http=${FIRSTMILE_RUN_MAILPIT_HTTP_PORT:-64530} ;;
  *) echo "unknown instance '$name' (test, bench or run)" >&2; exit 2 ;;
esac

install_mailpit() {
  if [ -x "$bin" ] && [ -f "$home/.installed" ]; then return 0; fi
  export PATH="/usr/local/go/bin:$PATH"
  command -v go >/dev/null || { echo "Go is needed to build Mailpit (install it to /usr/local/go)" >&2; exit 1; }
  echo "building Mailpit $version with go install (once; cached in $home)" >&2
  mkdir -p "$home"
  (
    exec 9>"$home/.lock"
    flock 9
    if [ -x "$bin" ] && [ -f "$home/.installed" ]; then exit 0; fi
    GOTOOLCHAIN=local GOBIN="$home/bin" GOFLAGS=-trimpath nice -n 10 go install "github.com/axllent/mailpit@$version"
    touch "$home/.installed"
  )
}

running_pid() {
  if [ -f "$dir/mailpit.pid" ] && kill -0 "$(cat "$dir/mailpit.pid")" 2>/dev/null; then cat "$dir/mailpit.pid"; fi
}

case "$cmd" in
  install) install_mailpit ;;
  path) echo "$bin" ;;
  url) echo "smtp://127.0.0.1:$smtp" ;;
  api) echo "http://127.0.0.1:$http" ;;
  start)
    if [ -n "$(running_pid)" ]; then echo "mailpit ($name) already running on 127.0.0.1:$smtp" >&2; exit 0; fi
    install_mailpit
    mkdir -p "$dir"
    rm -f "$dir/mailpit.db"*
    nohup "$bin" --smtp "127.0.0.1:$smtp" --listen "127.0.0.1:$http" --database "$dir/mailpit.db" \
      --smtp-auth-accept-any --smtp-auth-allow-insecure --enable-chaos --max 100000 \
      >"$dir/mailpit.log" 2>&1 &
    echo $! >"$dir/mailpit.pid"
    for _ in $(seq 1 100); do
      if curl -fsS "http://127.0.0.1:$http/readyz" >/dev/null 2>&1; then
        echo "mailpit ($name) started: SMTP 127.0.0.1:$smtp, API http://127.0.0.1:$http" >&2; exit 0
      fi
      sleep 0.1
    done
    echo "mailpit ($name) did not answer on 127.0.0.1:$http in 10 s; see $dir/mailpit.log" >&2
    tail -n 20 "$dir/mailpit.log" >&2 || true
    exit 1
    ;;
  stop)
    pid=$(running_pid)
    if [ -n "$pid" ]; then
      kill "$pid"
      for _ in $(seq 1 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
      echo "mailpit ($name) stopped" >&2
    fi
    rm -f "$dir/mailpit.pid"
    ;;
  *) echo "usage: $0 install|start|stop|url|api|path [test|bench|run]" >&2; exit 2 ;;
esac
