#!/usr/bin/env bash
# The Docker engine that `make images` builds with.
#   deploy/docker/engine.sh start    use a running engine, or start a private dockerd (idempotent)
#   deploy/docker/engine.sh stop     stop the private dockerd (only the one this script started)
#   deploy/docker/engine.sh status   exit 0 when an engine answers
#   deploy/docker/engine.sh env      print the DOCKER_HOST and DOCKER_BUILDKIT lines to eval
#   deploy/docker/engine.sh private  exit 0 when the engine in use is the private dockerd
#
# An engine that already answers (DOCKER_HOST, or /var/run/docker.sock) is used as it is. Otherwise
# the script installs Debian's docker.io (dockerd 20.10, containerd, runc) and starts a private
# dockerd: its images, build cache and pip cache live under
# ${FIRSTMILE_TOOLS:-~/.cache/firstmile-tools}/docker-engine-20.10 (kept between runs, so a warm
# `make images` rebuilds nothing), its sockets under /tmp/fm-docker (a unix socket path is limited to
# 107 bytes). It listens on that unix socket only (no TCP), with no bridge and no iptables rules:
# build steps use the host's network (pip needs PyPI) and the smoke checks run with --network none.
# The daemon runs until `stop`; `make images` stops it when it started it.
#
# The client is Debian's /usr/bin/docker (20.10) unless FIRSTMILE_DOCKER names another: it speaks
# BuildKit by itself (DOCKER_BUILDKIT=1), while a newer CLI needs the buildx plugin for that, which
# Debian bookworm does not package.
set -euo pipefail

cmd=${1:-start}
tools=${FIRSTMILE_TOOLS:-$HOME/.cache/firstmile-tools}
data="$tools/docker-engine-20.10"
run=/tmp/fm-docker
sock="$run/docker.sock"
pidfile="$run/dockerd.pid"
log="$data/dockerd.log"

client() {
  if [ -n "${FIRSTMILE_DOCKER:-}" ]; then echo "$FIRSTMILE_DOCKER"; elif [ -x /usr/bin/docker ]; then echo /usr/bin/docker; else command -v docker; fi
}

# An engine other than ours that already answers: the caller's DOCKER_HOST or the system socket.
external_host() {
  local docker
  docker=$(client) || return 1
  if [ -n "${DOCKER_HOST:-}" ] && [ "$DOCKER_HOST" != "unix://$sock" ]; then
    timeout 10 "$docker" version >/dev/null 2>&1 && { echo "$DOCKER_HOST"; return 0; }
  fi
  if [ -S /var/run/docker.sock ]; then
    DOCKER_HOST=unix:///var/run/docker.sock timeout 10 "$docker" version >/dev/null 2>&1 \
      && { echo unix:///var/run/docker.sock; return 0; }
  fi
  return 1
}

ours_running() {
  [ -s "$pidfile" ] && kill -0 "$(cat "$pidfile")" 2>/dev/null \
    && DOCKER_HOST="unix://$sock" timeout 10 "$(client)" version >/dev/null 2>&1
}

install_engine() {
  [ -x /usr/sbin/dockerd ] && [ -x /usr/bin/docker ] && return 0
  if [ "$(id -u)" != 0 ]; then
    echo "engine.sh: no Docker engine answers and dockerd is not installed; as root: apt-get install docker.io" >&2
    exit 1
  fi
  echo "engine.sh: installing Debian's docker.io (dockerd, containerd, runc)" >&2
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -q >&2 || true
  apt-get install -y -q --no-install-recommends docker.io >&2
}

start() {
  if host=$(external_host); then echo "engine.sh: using the engine at $host" >&2; return 0; fi
  if ours_running; then return 0; fi
  install_engine
  if [ "$(id -u)" != 0 ]; then
    echo "engine.sh: dockerd needs root (namespaces, overlay mounts, cgroups); run as root or start an engine and set DOCKER_HOST" >&2
    exit 1
  fi
  mkdir -p "$data" "$run"
  # A dockerd killed hard leaves its pid file and socket behind; both block the next start.
  rm -f "$pidfile" "$sock"
  echo "engine.sh: starting a private dockerd (data $data, socket $sock)" >&2
  # overlay2 (the kernel has overlayfs; vfs would copy the whole filesystem on every layer, and the
  # inference image carries ~5 GB of wheels). --bridge=none/--iptables=false: this VM has no
  # iptables and nothing here needs container networking beyond the host's.
  setsid /usr/sbin/dockerd \
    --host "unix://$sock" --data-root "$data/data" --exec-root "$run/exec" --pidfile "$pidfile" \
    --storage-driver overlay2 --bridge none --iptables=false --ip-masq=false --ip-forward=false \
    --containerd-namespace firstmile --containerd-plugins-namespace firstmile-plugins \
    --log-level warn \
    >>"$log" 2>&1 </dev/null &
  for _ in $(seq 1 60); do
    if ours_running; then echo "engine.sh: dockerd is up" >&2; return 0; fi
    sleep 1
  done
  echo "engine.sh: dockerd did not answer within 60 s; last lines of $log:" >&2
  tail -n 30 "$log" >&2
  exit 1
}

stop() {
  [ -s "$pidfile" ] || return 0
  local pid
  pid=$(cat "$pidfile")
  if kill -0 "$pid" 2>/dev/null; then
    kill "$pid"
    # dockerd stops its containers and its containerd child before it exits.
    for _ in $(seq 1 30); do kill -0 "$pid" 2>/dev/null || break; sleep 1; done
    if kill -0 "$pid" 2>/dev/null; then kill -9 "$pid"; fi
  fi
  rm -f "$pidfile"
}

case "$cmd" in
  start) start ;;
  stop) stop ;;
  status) external_host >/dev/null || ours_running ;;
  env)
    if host=$(external_host); then echo "export DOCKER_HOST=$host"; else echo "export DOCKER_HOST=unix://$sock"; fi
    echo "export DOCKER_BUILDKIT=1"
    echo "export DOCKER=$(client)"
    ;;
  private) ! external_host >/dev/null && ours_running ;;
  *) echo "usage: $0 start|stop|status|env|private" >&2; exit 2 ;;
esac
