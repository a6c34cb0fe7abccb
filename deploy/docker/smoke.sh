#!/usr/bin/env bash
# Smoke checks of the two images, run the way the chart runs them: the image's own user (never
# --user), read-only root filesystem, a tmpfs on /tmp only, every capability dropped, no new
# privileges, no network.
#   deploy/docker/smoke.sh API_IMAGE INFERENCE_IMAGE VERSION
# API: the configured user is 10001:10001 and the entrypoint `firstmile`; `firstmile --help` runs;
#   firstmile, firstmile.app and firstmile.cli import; the admin UI's assets are in the package;
#   torch is not importable; the root filesystem refuses writes; HOME (/tmp) takes them; the default
#   command (serve) answers /health/live and /health/ready in embedded mode, data on a volume.
# Inference: firstmile_inference (and .serve), ray, ray.serve and torch import, firstmile does not
#   (the inference image stands alone); then a Ray head starts as KubeRay starts it (bash, ray on
#   PATH), KubeRay's own probe commands (wget | grep success) pass, and Serve deploys the real
#   index application (HAProxy ingress, as in docs/serving.md), which answers an unknown path with
#   its problem+json 404.
set -euo pipefail

api=$1
inference=$2
version=$3
docker=${DOCKER:-docker}
tmpfs=/tmp:rw,nosuid,nodev,size=1g
run=("$docker" run --rm --read-only --tmpfs "$tmpfs" --network none --cap-drop ALL --security-opt no-new-privileges)

fail() { echo "smoke: FAIL: $*" >&2; exit 1; }
ok() { echo "smoke: ok: $*"; }

for image in "$api" "$inference"; do
  user=$("$docker" image inspect -f '{{.Config.User}}' "$image")
  [ "$user" = 10001:10001 ] || fail "$image runs as '$user', not 10001:10001"
  label=$("$docker" image inspect -f '{{index .Config.Labels "org.opencontainers.image.version"}}' "$image")
  [ "$label" = "$version" ] || fail "$image is labelled version '$label', not $version"
done
ok "both images: USER 10001:10001, org.opencontainers.image.version=$version"

entrypoint=$("$docker" image inspect -f '{{json .Config.Entrypoint}}' "$api")
[ "$entrypoint" = '["firstmile"]' ] || fail "$api's entrypoint is $entrypoint"
"${run[@]}" "$api" --help | grep -q '^Usage: firstmile' || fail "firstmile --help"
ok "$api: firstmile --help"

"${run[@]}" --entrypoint python "$api" -c '
import importlib.resources, importlib.util, os, pathlib
assert os.getuid() != 0 and os.getgid() != 0, (os.getuid(), os.getgid())
import firstmile, firstmile.app, firstmile.cli
assert firstmile.__version__ == "'"$version"'", firstmile.__version__
web = importlib.resources.files("firstmile.web")
for asset in ("admin.css", "admin.js", "templates/base.html"):
    assert web.joinpath(asset).is_file(), asset
assert importlib.util.find_spec("torch") is None, "torch is installed"
try:
    import torch  # noqa: F401
except ImportError:
    pass
else:
    raise AssertionError("torch imported")
for target in ("/opt/firstmile/probe", "/probe", "/var/lib/firstmile/probe"):
    try:
        pathlib.Path(target).write_text("x")
    except OSError:
        pass
    else:
        raise AssertionError(f"wrote {target} on a read-only root")
pathlib.Path(os.environ["HOME"], "probe").write_text("x")
print("uid", os.getuid(), "gid", os.getgid(), "firstmile", firstmile.__version__)
' || fail "$api: imports, user, no torch, read-only root"
ok "$api: non-root, firstmile imports, admin UI assets, torch absent, root filesystem read-only"

# The image's default command serves: embedded mode (no FIRSTMILE_DATABASE_URL), so pgserver's
# PostgreSQL runs in the container too, its data on a volume at FIRSTMILE_DATA_DIR (the only
# writable place besides /tmp). /health/ready answers 200 once the database is migrated and
# reachable. An anonymous volume, removed with the container (rm -v).
name="firstmile-smoke-api-$$"
trap '"$docker" rm -fv "$name" > /dev/null 2>&1 || true' EXIT
"${run[@]}" -d --name "$name" -v /var/lib/firstmile "$api" serve --host 127.0.0.1 --port 8000 > /dev/null
ready=
for _ in $(seq 1 60); do
  if "$docker" exec "$name" python -c '
import json, urllib.request
for path in ("/health/live", "/health/ready"):
    with urllib.request.urlopen("http://127.0.0.1:8000" + path, timeout=5) as answer:
        assert answer.status == 200, (path, answer.status)
        print(path, answer.status, json.loads(answer.read())["status"])
' 2>/dev/null; then ready=1; break; fi
  sleep 2
done
[ -n "$ready" ] || { "$docker" logs "$name" 2>&1 | tail -n 30; fail "$api: serve did not become ready"; }
"$docker" rm -fv "$name" > /dev/null
ok "$api: firstmile serve (embedded PostgreSQL on the data volume): /health/live and /health/ready 200"

"${run[@]}" "$inference" python -c '
import importlib.util, os
assert os.getuid() != 0 and os.getgid() != 0, (os.getuid(), os.getgid())
import firstmile_inference, firstmile_inference.serve, ray, ray.serve, torch
assert importlib.util.find_spec("firstmile") is None, "the platform package is in the inference image"
assert float(torch.ones(3).sum()) == 3.0
print("uid", os.getuid(), "torch", torch.__version__, "ray", ray.__version__)
' || fail "$inference: imports"
ok "$inference: non-root, firstmile_inference, ray, ray.serve and torch import; firstmile absent"

# KubeRay's head container: its command is `/bin/bash -c -- "ulimit -n 65536; ray start --head ..."`
# and its probes `bash -c "wget ... | grep success && ..."` (ray-operator v1.5.0,
# controllers/ray/common/pod.go). ulimit may fail where the engine's hard limit is lower (it does
# here: 20000); KubeRay's command line goes on after it, and so does this one.
# shellcheck disable=SC2016  # the script runs in the container's bash, which expands it
"${run[@]}" --shm-size 512m -e RAY_SERVE_ENABLE_DIRECT_INGRESS=1 -e RAY_SERVE_ENABLE_HA_PROXY=1 \
  "$inference" /bin/bash -c -- '
set -u
ulimit -n 65536 2>/dev/null
ray start --head --num-cpus=2 --dashboard-host=127.0.0.1 --disable-usage-stats > /tmp/ray-start.log 2>&1 \
  || { tail -n 20 /tmp/ray-start.log; exit 1; }
trap "ray stop --force > /dev/null 2>&1" EXIT
probes=no
for _ in $(seq 1 30); do
  if wget --tries 1 -T 2 -q -O- http://localhost:52365/api/local_raylet_healthz | grep -q success \
     && wget --tries 1 -T 10 -q -O- http://localhost:8265/api/gcs_healthz | grep -q success; then
    probes=yes; break
  fi
  sleep 2
done
[ "$probes" = yes ] || { echo "KubeRay head probes failed"; exit 1; }
echo "smoke: ok: ray head up as $(id -un) ($(id -u)); KubeRay probes (raylet, GCS) pass"
cat > /tmp/serve.yaml <<EOF
proxy_location: HeadOnly
http_options: {host: 0.0.0.0, port: 8000}
applications:
  - name: index
    route_prefix: /
    import_path: firstmile_inference.serve:build_index_app
    args: {models: [path_classifier], registry_uri: file:///var/lib/firstmile/models}
EOF
serve deploy /tmp/serve.yaml > /tmp/serve-deploy.log 2>&1 || { cat /tmp/serve-deploy.log; exit 1; }
status=
for _ in $(seq 1 60); do
  status=$(serve status 2>/dev/null || true)
  if grep -qE "status: (RUNNING|DEPLOY_FAILED)" <<< "$status"; then break; fi
  sleep 2
done
grep -q "status: RUNNING" <<< "$status" || { echo "$status" | head -n 40; exit 1; }
python - <<EOF
import json, urllib.error, urllib.request
assert urllib.request.urlopen("http://127.0.0.1:8000/-/healthz", timeout=10).read().strip() == b"success"
try:
    urllib.request.urlopen("http://127.0.0.1:8000/smoke/no-such-route", timeout=10)
except urllib.error.HTTPError as error:
    body = json.loads(error.read())
    assert error.code == 404 and error.headers["content-type"].startswith("application/problem+json"), (error.code, error.headers)
    assert body["type"].endswith("not-found"), body
else:
    raise AssertionError("an unknown path answered 2xx")
EOF
echo "smoke: ok: Serve runs the index application (HAProxy ingress): /-/healthz success, unknown path 404 problem+json"
' || fail "$inference: ray head, KubeRay probes, Serve"
echo "smoke: all checks passed"
