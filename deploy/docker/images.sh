#!/usr/bin/env bash
# `make images`: build firstmile-api:<version> and firstmile-inference:<version> and smoke-check
# them (deploy/docker/smoke.sh). Idempotent: a second run with nothing changed rebuilds no layer.
#
# Steps: an engine (deploy/docker/engine.sh: a running one, or a private dockerd, stopped again at
# the end when this script started it), the local base (deploy/docker/base.sh, skipped when
# present), both builds with BuildKit, the smoke checks, a summary with sizes and times.
#
# Environment:
#   FIRSTMILE_API_BASE_IMAGE, FIRSTMILE_INFERENCE_BASE_IMAGE   another BASE_IMAGE (then base.sh is skipped)
#   FIRSTMILE_TORCH_VARIANT        the inference lock to use (default pypi)
#   FIRSTMILE_BUILD_CA_BUNDLE      CA bundle given to the build's network steps as the BuildKit secret
#                                  ca_bundle (default: the host's /etc/ssl/certs/ca-certificates.crt,
#                                  which trusts this machine's TLS-inspecting proxy); empty: none
#   FIRSTMILE_KEEP_ENGINE=1        leave a private dockerd running afterwards
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/../.." && pwd)
cd "$root"

version=$(python3 -c "import tomllib; print(tomllib.load(open('pyproject.toml', 'rb'))['project']['version'])")
revision=$(git rev-parse HEAD 2>/dev/null || echo unknown)
# The commit's time, not the clock's: the same commit labels the same image, so a warm rebuild
# changes nothing.
created=$(git log -1 --format=%cd --date=format-local:%Y-%m-%dT%H:%M:%SZ 2>/dev/null || echo 1970-01-01T00:00:00Z)
if [ -n "$(git status --porcelain -- pyproject.toml README.md platform inference deploy/docker 2>/dev/null)" ]; then
  revision="$revision-dirty"
fi
api="firstmile-api:$version"
inference="firstmile-inference:$version"
ca=${FIRSTMILE_BUILD_CA_BUNDLE-/etc/ssl/certs/ca-certificates.crt}

started=$(date +%s)
phase() { echo; echo "== images: $* ($(( $(date +%s) - started )) s)"; }

phase "engine"
we_started=
if ! "$here/engine.sh" status 2>/dev/null; then
  "$here/engine.sh" start
  we_started=1
fi
eval "$("$here/engine.sh" env)"
if [ -n "$we_started" ] && [ -z "${FIRSTMILE_KEEP_ENGINE:-}" ]; then
  trap '"$here/engine.sh" stop' EXIT
fi
echo "engine: $DOCKER_HOST, server $("$DOCKER" version --format '{{.Server.Version}}')"

api_base=${FIRSTMILE_API_BASE_IMAGE:-}
inference_base=${FIRSTMILE_INFERENCE_BASE_IMAGE:-}
if [ -z "$api_base" ] || [ -z "$inference_base" ]; then
  phase "base image (debootstrap, once)"
  "$here/base.sh"
fi

build() {
  local dockerfile=$1 tag=$2 base=$3
  shift 3
  local args=(--progress=plain --network host -f "deploy/docker/$dockerfile" -t "$tag"
    --build-arg "VERSION=$version" --build-arg "REVISION=$revision" --build-arg "CREATED=$created")
  [ -n "$base" ] && args+=(--build-arg "BASE_IMAGE=$base")
  [ -n "$ca" ] && [ -s "$ca" ] && args+=(--secret "id=ca_bundle,src=$ca")
  local t0
  t0=$(date +%s)
  "$DOCKER" build "${args[@]}" "$@" .
  echo "built $tag in $(( $(date +%s) - t0 )) s"
}

phase "build $api"
build api.Dockerfile "$api" "$api_base"
phase "build $inference"
build inference.Dockerfile "$inference" "$inference_base" --build-arg "TORCH_VARIANT=${FIRSTMILE_TORCH_VARIANT:-pypi}"

# The image a tag pointed to before this build is left untagged; in the private engine nothing
# else uses it. (Not the build cache: the builder stages' layers and the wheel cache are what make
# the next build warm.)
if "$here/engine.sh" private; then
  "$DOCKER" image prune -f > /dev/null
fi

phase "smoke checks"
"$here/smoke.sh" "$api" "$inference" "$version"

phase "done"
"$DOCKER" image ls --format 'table {{.Repository}}:{{.Tag}}\t{{.ID}}\t{{.Size}}' \
  | grep -E "^(REPOSITORY|firstmile-api:$version|firstmile-inference:$version|firstmile/debian-base:)"
