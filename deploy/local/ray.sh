#!/usr/bin/env bash
# A private single-node Ray cluster with Firstmile's Ray Serve application, on loopback.
#   deploy/local/ray.sh start  [test|bench|dev]   start the head node (idempotent)
#   deploy/local/ray.sh deploy [test|bench|dev] [REGISTRY] [key=value ...]
#                                                 deploy inference/serve_config.yaml with this registry
#                                                 ($FIRSTMILE_MODEL_REGISTRY_URI when not given) and
#                                                 wait until every application (one per model, and
#                                                 the index) is RUNNING; key=value and
#                                                 FIRSTMILE_SERVE_<KEY> override the file's args
#                                                 (models=a,b deploys those models' applications only).
#                                                 Deploying again reloads the models in place (after a
#                                                 promotion): a fresh reload_token in each model's user_config.
#   deploy/local/ray.sh status [test|bench|dev]   the node and the applications' status
#   deploy/local/ray.sh url    [test|bench|dev]   print the HTTP base URL of the application
#   deploy/local/ray.sh stop   [test|bench|dev]   stop this instance only (idempotent)
#
# Ports: each instance owns a block of 100 from its GCS port (test 64100, bench 57200, dev 57000):
# +1 client server, +2 dashboard (API server only, no UI), +3/+4 dashboard agent, +5 runtime-env
# agent, +6 metrics export (Prometheus), +7 node manager, +8 object manager, +20..+99 workers.
# HTTP (HAProxy, or Serve's proxy with FIRSTMILE_RAY_INGRESS=proxy): test 64300, bench 58200, dev 8100 (8000 is the Firstmile API).
# The test instance sits above the ephemeral range (32768-60999 here): it starts in the middle of a suite that opens
# thousands of client sockets, one of which took its dashboard agent's port once (57104, "Address already in use").
# Another instance name (lower case, digits, - and _; at most 7 characters) takes its GCS port from FIRSTMILE_RAY_PORT and its
# HTTP port from FIRSTMILE_RAY_SERVE_PORT, given to every command of it (tests/support/chaos.py does so
# for the chaos test's own instance: its blocks of 100 and 70 ports must be free).
#
# Loopback only: Ray on Linux replaces 127.0.0.1 by the machine's address and listens on all
# interfaces unless RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0, which this script sets for the node and
# for every driver it runs (any other driver that connects must set it too).
#
# Ray's token authentication is on, with a token per instance in .firstmile/services/ray-<name>/auth_token
# (RAY_AUTH_MODE=token RAY_AUTH_TOKEN_PATH=...: a driver such as `serve status` needs both). The HTTP
# API of the application is not behind it.
#
# Ray's temporary folder (sockets, logs) is /tmp/fm-ray-<name>, not .firstmile/services/: a unix
# socket path is limited to 107 bytes and Ray's sockets sit three folders below it
# (<temp>/session_<date>_<time>_<pid>/sockets/plasma_store). .firstmile/services/ray-<name>/ holds
# this script's state: the session id file, start.log, the generated serve config, a logs link.
#
# `ray stop` kills every Ray process of the user on the machine, other instances included, so this
# script starts each instance in its own process session (setsid) and stops exactly the processes
# of that session (SIGTERM, then SIGKILL after FIRSTMILE_RAY_STOP_GRACE seconds, default 3:
# the GCS server and raylet take longer than that to exit on SIGTERM, and the instance holds
# nothing worth a graceful shutdown).
#
# Environment: FIRSTMILE_RAY_NUM_CPUS (logical CPUs, default 4: the test app's replicas ask for
# 0.5 each, so they fit on a 2-core machine), FIRSTMILE_RAY_NUM_GPUS (default: Ray detects them),
# FIRSTMILE_RAY_OBJECT_STORE_MB (default 256), FIRSTMILE_RAY_DEPLOY_TIMEOUT (seconds, default 300),
# FIRSTMILE_RAY_INGRESS (haproxy, the default, or proxy; below).
set -euo pipefail

cmd=${1:-start}
name=${2:-test}
here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/../.." && pwd)
dir="$root/.firstmile/services/ray-$name"
tmp="/tmp/fm-ray-$name"
case "$name" in
  test) gcs=${FIRSTMILE_TEST_RAY_PORT:-64100}; http=${FIRSTMILE_TEST_SERVE_PORT:-64300} ;;
  bench) gcs=${FIRSTMILE_BENCH_RAY_PORT:-57200}; http=${FIRSTMILE_BENCH_SERVE_PORT:-58200} ;;
  dev) gcs=${FIRSTMILE_DEV_RAY_PORT:-57000}; http=${FIRSTMILE_DEV_SERVE_PORT:-8100} ;;
  *)
    # Any other name is an instance of the caller's (the chaos test's), on the ports it chose.
    # At most 7 characters: HAProxy refuses socket paths over 97 bytes, and Serve puts its sockets at
    # /tmp/fm-ray-<name>/haproxy/<56 hex>/metrics.sock.
    if [[ "$name" =~ ^[a-z][a-z0-9_-]{0,6}$ ]] && [ -n "${FIRSTMILE_RAY_PORT:-}" ] && [ -n "${FIRSTMILE_RAY_SERVE_PORT:-}" ]; then
      gcs=$FIRSTMILE_RAY_PORT; http=$FIRSTMILE_RAY_SERVE_PORT
    else
      echo "unknown instance '$name' (test, bench or dev; another name needs FIRSTMILE_RAY_PORT and FIRSTMILE_RAY_SERVE_PORT)" >&2
      exit 2
    fi ;;
esac
if [ -x "$root/.venv/bin/ray" ]; then bin="$root/.venv/bin"; else bin=$(dirname "$(command -v ray || echo /usr/bin/ray)"); fi
export RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 RAY_USAGE_STATS_ENABLED=0 RAY_DEDUP_LOGS=0
# Token authentication with this instance's own token (not ~/.ray/auth_token, which Ray would
# otherwise create and share between every cluster of the user): the node and every driver here.
export RAY_AUTH_MODE=token RAY_AUTH_TOKEN_PATH="$dir/auth_token"
# Ingress (FIRSTMILE_RAY_INGRESS, read at start; the node's processes inherit it):
#   haproxy (default): Serve's direct ingress behind HAProxy (Ray 2.60 feature flags). Each
#     application's ingress replica runs its own HTTP server on a port of HTTP+10..+39 (gRPC
#     +40..+69) and HAProxy listens on the HTTP port and routes by route prefix straight to them:
#     no Python proxy, no actor call back to it for the request body. Batch-1 p50 on the 2-core
#     box: ~2.1 ms against ~11 ms through the proxy (docs/serving.md). HAProxy's stats and
#     metrics ports (HTTP+1, +2) and files ($tmp/haproxy) are per instance: Ray's defaults
#     (8404, 9101, /tmp/haproxy-serve) would be shared by every instance on the machine.
#   proxy: Serve's Python HTTP proxy (Ray's default).
# The same functions in Python: firstmile_inference.serve.ingress_environment (bench.py --start-ray).
ingress=${FIRSTMILE_RAY_INGRESS:-haproxy}
case "$ingress" in
  haproxy)
    export RAY_SERVE_ENABLE_DIRECT_INGRESS=1 RAY_SERVE_ENABLE_HA_PROXY=1 \
      RAY_SERVE_DIRECT_INGRESS_MIN_HTTP_PORT=$((http + 10)) RAY_SERVE_DIRECT_INGRESS_MAX_HTTP_PORT=$((http + 39)) \
      RAY_SERVE_DIRECT_INGRESS_MIN_GRPC_PORT=$((http + 40)) RAY_SERVE_DIRECT_INGRESS_MAX_GRPC_PORT=$((http + 69)) \
      RAY_SERVE_HAPROXY_STATS_PORT=$((http + 1)) RAY_SERVE_HAPROXY_METRICS_PORT=$((http + 2)) \
      RAY_SERVE_HAPROXY_CONFIG_FILE_LOC="$tmp/haproxy/haproxy.cfg" RAY_SERVE_HAPROXY_SOCKET_PATH="$tmp/haproxy/admin.sock" \
      RAY_SERVE_HAPROXY_SERVER_STATE_BASE="$tmp/haproxy" RAY_SERVE_HAPROXY_SERVER_STATE_FILE="$tmp/haproxy/server-state" \
      RAY_SERVE_HAPROXY_METRICS_SOCKET_PATH="$tmp/haproxy/metrics.sock" ;;
  proxy) ;;
  *) echo "FIRSTMILE_RAY_INGRESS must be haproxy or proxy, got '$ingress'" >&2; exit 2 ;;
esac

elapsed() { awk -v a="$1" -v b="$(date +%s.%N)" 'BEGIN { printf "%.1f", b - a }'; }

port_open() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

# The processes of this instance: those in the process session recorded at start.
session_pids() {
  [ -f "$dir/session.id" ] || return 0
  local sid
  sid=$(cat "$dir/session.id")
  ps -e -o pid=,sid=,stat= | awk -v s="$sid" '$2 == s && $3 !~ /^Z/ { print $1 }'  # zombies are gone already
}

running() { [ -n "$(session_pids)" ] && port_open "$gcs"; }

# Python run as a Ray driver against this instance (exit codes: 0 ok, 1 failed, 2 not yet).
driver() {
  "$bin/python" - "$@" <<'PY'
import os, sys, time, warnings
warnings.simplefilter("ignore")
import ray
from ray import serve

mode, address, apps, timeout = sys.argv[1], sys.argv[2], sys.argv[3], float(sys.argv[4])
since = float(sys.argv[5]) if len(sys.argv) > 5 else 0.0  # wait for a deploy submitted after this
ray.init(address=address, logging_level="ERROR", log_to_driver=False, configure_logging=False)
deadline = time.monotonic() + timeout
last = {}

def phase_of(state):
    if state is None:
        return "NOT_STARTED"
    return str(state.status.value if hasattr(state.status, "value") else state.status)

while True:
    status = serve.status()
    if mode == "status":  # every application there is
        if not status.applications:
            print("serve: no applications")
        for app, state in sorted(status.applications.items()):
            print(f"serve application {app}: {phase_of(state)}")
            for dep_name, dep in state.deployments.items():
                dep_status = getattr(dep.status, "value", dep.status)
                print(f"  {dep_name}: {dep_status} {dict(dep.replica_states)} {dep.message}".rstrip())
        sys.exit(0)
    phases = {}
    for app in apps.split(","):
        state = status.applications.get(app)
        phase = phase_of(state)
        if state and state.last_deployed_time_s < since - 1:
            phase = "SUBMITTED"  # the controller has not taken this deploy yet
        phases[app] = phase
        if phase != last.get(app):
            print(f"serve application {app}: {phase}", file=sys.stderr)
        if phase in ("DEPLOY_FAILED", "UNHEALTHY"):
            print(state.message, file=sys.stderr)
            for dep_name, dep in state.deployments.items():
                if dep.message:
                    print(f"  {dep_name}: {getattr(dep.status, 'value', dep.status)}: {dep.message}", file=sys.stderr)
            sys.exit(1)
    last = phases
    if all(phase == "RUNNING" for phase in phases.values()):
        sys.exit(0)
    if time.monotonic() > deadline:
        waiting = [f"{app} {phase}" for app, phase in phases.items() if phase != "RUNNING"]
        print(f"not RUNNING after {timeout:.0f} s: {', '.join(waiting)}", file=sys.stderr)
        sys.exit(2)
    time.sleep(0.5)
PY
}

stop_instance() {
  local pids
  pids=$(session_pids)
  if [ -z "$pids" ]; then rm -f "$dir/session.id"; return 0; fi
  # shellcheck disable=SC2086
  kill -TERM $pids 2>/dev/null || true
  for _ in $(seq 1 $(( ${FIRSTMILE_RAY_STOP_GRACE:-3} * 4 ))); do
    [ -z "$(session_pids)" ] && break
    sleep 0.25
  done
  pids=$(session_pids)
  # shellcheck disable=SC2086
  [ -n "$pids" ] && kill -KILL $pids 2>/dev/null || true
  for _ in $(seq 1 20); do
    [ -z "$(session_pids)" ] && break
    sleep 0.25
  done
  rm -f "$dir/session.id"
  echo "ray ($name) stopped" >&2
}

case "$cmd" in
  url)
    echo "http://127.0.0.1:$http"
    ;;
  start)
    if running; then echo "ray ($name) already running, GCS 127.0.0.1:$gcs" >&2; exit 0; fi
    stop_instance  # leftovers of a half-dead instance
    [ -x "$bin/ray" ] || { echo "ray is not installed (make install: the inference extra)" >&2; exit 1; }
    for p in "$gcs" "$http"; do
      if port_open "$p"; then echo "port 127.0.0.1:$p is taken; ray ($name) cannot start" >&2; exit 1; fi
    done
    mkdir -p "$dir"
    rm -rf "$tmp"
    mkdir -p "$tmp/haproxy"
    if [ ! -s "$dir/auth_token" ]; then
      (umask 077 && head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \n' > "$dir/auth_token")
    fi
    ln -sfn "$tmp/session_latest/logs" "$dir/logs"
    gpus=()
    if [ -n "${FIRSTMILE_RAY_NUM_GPUS:-}" ]; then gpus=(--num-gpus="$FIRSTMILE_RAY_NUM_GPUS"); fi
    started=$(date +%s.%N)
    # setsid: the instance gets its own process session, which `stop` kills and nothing else.
    if ! setsid --wait bash -c 'echo $$ > "$0"; exec "$@"' "$dir/session.id" \
      "$bin/ray" start --head --node-ip-address=127.0.0.1 --port="$gcs" \
      --num-cpus="${FIRSTMILE_RAY_NUM_CPUS:-4}" "${gpus[@]}" \
      --object-store-memory=$(( ${FIRSTMILE_RAY_OBJECT_STORE_MB:-256} * 1024 * 1024 )) \
      --include-dashboard=false --dashboard-host=127.0.0.1 --disable-usage-stats --temp-dir="$tmp" \
      --ray-client-server-port=$((gcs + 1)) --dashboard-port=$((gcs + 2)) \
      --dashboard-agent-listen-port=$((gcs + 3)) --dashboard-agent-grpc-port=$((gcs + 4)) \
      --runtime-env-agent-port=$((gcs + 5)) --metrics-export-port=$((gcs + 6)) \
      --node-manager-port=$((gcs + 7)) --object-manager-port=$((gcs + 8)) \
      --min-worker-port=$((gcs + 20)) --max-worker-port=$((gcs + 99)) \
      >"$dir/start.log" 2>&1 </dev/null; then
      echo "ray ($name) failed to start; see $dir/start.log" >&2; tail -n 20 "$dir/start.log" >&2 || true
      stop_instance; exit 1
    fi
    for _ in $(seq 1 60); do
      if running; then
        echo "ray ($name) started in $(elapsed "$started") s, GCS 127.0.0.1:$gcs, ingress $ingress, logs $dir/logs" >&2
        exit 0
      fi
      sleep 0.5
    done
    echo "ray ($name) did not come up; see $dir/start.log and $tmp" >&2; stop_instance; exit 1
    ;;
  deploy)
    running || { echo "ray ($name) is not running: $0 start $name" >&2; exit 1; }
    shift 2 || true
    registry=${FIRSTMILE_MODEL_REGISTRY_URI:-}
    if [ $# -gt 0 ] && [[ "$1" != *=* ]]; then registry=$1; shift; fi
    [ -n "$registry" ] || { echo "usage: $0 deploy $name REGISTRY [key=value ...] (or set FIRSTMILE_MODEL_REGISTRY_URI)" >&2; exit 2; }
    mkdir -p "$dir"
    # The config file with this instance's port, the registry, a fresh reload token and the overrides;
    # prints the names of the applications it holds.
    apps=$("$bin/python" - "$root/inference/serve_config.yaml" "$dir/serve_config.yaml" "$http" "$registry" "$@" <<'PY'
import copy, os, sys, time, yaml
src, dst, port, registry, *pairs = sys.argv[1:]
with open(src) as fh:
    config = yaml.safe_load(fh)  # resolves the file's `<<: *args` merges
config["http_options"].update(host="127.0.0.1", port=int(port))
overrides = {}
for key, value in os.environ.items():
    if key.startswith("FIRSTMILE_SERVE_"):
        overrides[key.removeprefix("FIRSTMILE_SERVE_").lower()] = value
for pair in pairs:
    key, sep, value = pair.partition("=")
    if not sep:
        sys.exit(f"expected key=value, got {pair!r}")
    overrides[key] = yaml.safe_load(value)
if "model" in overrides:
    sys.exit("`model` is per application; use models=a,b to choose the model applications")
overrides["registry_uri"] = registry
index = next(a for a in config["applications"] if "model" not in (a.get("args") or {}))
models = overrides.get("models") or index.get("args", {}).get("models") or [
    "path_classifier", "stuck_detector", "nudge_response_predictor"]
if isinstance(models, str):
    models = [m.strip() for m in models.split(",") if m.strip()]
overrides["models"] = models
known = {a["args"]["model"] for a in config["applications"] if "model" in (a.get("args") or {})}
if set(models) - known:
    sys.exit(f"no application for {sorted(set(models) - known)} in the config file")
# A fresh reload_token in each model's user_config: Serve reconfigures the running replicas in place
# (they re-read the registry's stages); a change in args would replace the application's replicas.
token = f"{time.time():.6f}"
applications = []
for application in config["applications"]:
    args = application.setdefault("args", {})
    model = args.get("model")
    if model is not None and model not in models:
        continue  # that model is not deployed (the index does not list it either)
    application["args"] = {**copy.deepcopy(args), **copy.deepcopy(overrides)}
    if model is not None:
        deployments = application.setdefault("deployments", [])
        entry = next((d for d in deployments if d["name"] == model), None)
        if entry is None:
            entry = {"name": model}
            deployments.append(entry)
        entry["user_config"] = {**(entry.get("user_config") or {}), "reload_token": token}
    applications.append(application)
config["applications"] = applications
with open(dst, "w") as fh:
    yaml.safe_dump(config, fh, sort_keys=False)
print(",".join(a["name"] for a in applications))
PY
)
    started=$(date +%s.%N)
    (cd "$root" && "$bin/serve" run --non-blocking --address="127.0.0.1:$gcs" "$dir/serve_config.yaml") \
      >"$dir/deploy.log" 2>&1 || { echo "serve run failed; see $dir/deploy.log" >&2; tail -n 20 "$dir/deploy.log" >&2; exit 1; }
    set +e
    driver wait "127.0.0.1:$gcs" "$apps" "${FIRSTMILE_RAY_DEPLOY_TIMEOUT:-300}" "$started"
    status=$?
    set -e
    if [ $status -ne 0 ]; then
      echo "the applications did not all reach RUNNING; replica logs: $dir/logs/serve/" >&2; exit 1
    fi
    echo "serve ($name) RUNNING in $(elapsed "$started") s at http://127.0.0.1:$http: $apps (registry $registry)" >&2
    ;;
  status)
    if ! running; then echo "ray ($name) is not running"; exit 3; fi
    echo "ray ($name) running, GCS 127.0.0.1:$gcs, session $(cat "$dir/session.id"), $(session_pids | wc -l) processes"
    driver status "127.0.0.1:$gcs" - 0
    ;;
  stop)
    stop_instance
    ;;
  *)
    echo "usage: $0 start|stop|status|deploy|url [test|bench|dev]" >&2; exit 2 ;;
esac
