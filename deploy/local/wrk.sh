#!/usr/bin/env bash
# Debian's wrk, the HTTP load generator of the API, planner and admin benchmarks (the benchmarks never install it).
#   deploy/local/wrk.sh install   install the Debian package if missing (idempotent; needs root when it installs)
# apt-get update runs only when apt does not know the package yet (a fresh machine's empty lists), or when
# installing from the lists at hand failed (stale lists name versions the mirror no longer has).
set -euo pipefail

cmd=${1:-install}

binary() {
  command -v wrk 2>/dev/null || true
}

case "$cmd" in
  install)
    if [ -n "$(binary)" ]; then exit 0; fi
    if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null 2>&1; then
      echo "wrk is not installed: install it as root (Debian/Ubuntu: sudo apt-get install wrk) and rerun" >&2
      exit 1
    fi
    echo "installing wrk from Debian packages" >&2
    export DEBIAN_FRONTEND=noninteractive
    install_wrk() { apt-get install -y -qq wrk >/dev/null; }
    if ! apt-cache show wrk >/dev/null 2>&1; then apt-get update -qq; fi
    install_wrk || { apt-get update -qq && install_wrk; }
    if [ -z "$(binary)" ]; then echo "wrk was installed but is not on PATH" >&2; exit 1; fi
    ;;
  *)
    echo "usage: $0 install" >&2; exit 2
    ;;
esac
