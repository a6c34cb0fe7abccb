#!/usr/bin/env bash
# Regenerates the images' pinned requirements, every distribution with its sha256 hashes (the
# Dockerfiles install them with --require-hashes). Run it after a change to pyproject.toml's
# dependencies, or to take new versions, and commit the files it writes:
#   deploy/docker/lock.sh                   requirements-api.txt, requirements-inference-pypi.txt, requirements-build.txt
#   deploy/docker/lock.sh inference VARIANT requirements-inference-VARIANT.txt: torch from PyTorch's own index
#                                           (VARIANT = cpu, cu126, cu128, ...: uv's --torch-backend), for
#                                           `--build-arg TORCH_VARIANT=VARIANT`; needs download.pytorch.org,
#                                           which this machine cannot reach
#
# Versions: those installed in .venv (what `make test` runs) when it exists, as constraints, else the
# newest that pyproject.toml allows. Resolution is universal (markers, hashes of every platform's
# wheel), so the same files build linux/amd64 and linux/arm64 images. Target: CPython 3.11.
#   api:       pyproject's [project].dependencies (no extras: no torch)
#   inference: pyproject's `inference` extra, plus msgspec from [project].dependencies, which
#              firstmile_inference.serve imports (the extra does not name it)
#   build:     pyproject's [build-system].requires (hatchling, to build the firstmile wheel) and uv
#              (the builder's installer), at the version in .venv
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/../.." && pwd)
cd "$root"
uv=${UV:-.venv/bin/uv}
[ -x "$uv" ] || uv=$(command -v uv) || { echo "lock.sh: uv not found (make install)" >&2; exit 1; }
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT

# The dev venv's versions (the editable firstmile itself excluded) become constraints.
: > "$tmp/dev-venv-versions.txt"
if [ -x .venv/bin/python ]; then
  "$uv" pip freeze --python .venv/bin/python | grep -Ev '^(-e |firstmile( |=|@))' > "$tmp/dev-venv-versions.txt"
fi

# Pieces of pyproject.toml, read with tomllib so that nothing here repeats a version bound.
pyproject() { python3 -c "import sys, tomllib; d = tomllib.load(open('pyproject.toml', 'rb')); $1"; }

compile() {
  local out=$1 cmd=$2
  shift 2
  echo "lock.sh: $out" >&2
  "$uv" pip compile --quiet --universal --python-version 3.11 --generate-hashes --no-strip-extras \
    --custom-compile-command "$cmd" -o "$here/$out" "$@"
  # The inputs are temporary files: name them without their folder, so that a refresh diffs cleanly.
  sed -i "s#$tmp/##g" "$here/$out"
}

pyproject "print('\n'.join(d['project']['optional-dependencies']['inference']))" > "$tmp/inference-extra.in"
pyproject "print('\n'.join(r for r in d['project']['dependencies'] if r.startswith('msgspec')))" >> "$tmp/inference-extra.in"

if [ "${1:-}" = inference ] && [ -n "${2:-}" ]; then
  # The variant's torch (e.g. 2.15.0+cpu) is not the venv's: constrain everything else.
  grep -Ev '^(torch|triton|nvidia-)' "$tmp/dev-venv-versions.txt" > "$tmp/dev-venv-versions-but-torch.txt" || true
  compile "requirements-inference-$2.txt" "deploy/docker/lock.sh inference $2" \
    -c "$tmp/dev-venv-versions-but-torch.txt" --torch-backend "$2" "$tmp/inference-extra.in"
  exit 0
fi

compile requirements-api.txt "deploy/docker/lock.sh" -c "$tmp/dev-venv-versions.txt" pyproject.toml
compile requirements-inference-pypi.txt "deploy/docker/lock.sh" -c "$tmp/dev-venv-versions.txt" "$tmp/inference-extra.in"
pyproject "print('\n'.join(d['build-system']['requires']))" > "$tmp/build-system.in"
"$uv" --version | awk '{print "uv==" $2}' >> "$tmp/build-system.in"
compile requirements-build.txt "deploy/docker/lock.sh" -c "$tmp/dev-venv-versions.txt" "$tmp/build-system.in"
