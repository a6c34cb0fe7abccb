#!/usr/bin/env bash
# The offline checks of terraform/ (README.md, "Checking it offline"): formatting, init from
# the filesystem mirror against the committed lock files, validate, the plan-time tests with a
# mocked AWS provider, the bad-input messages and, when CHECKOV names a checkov binary, the
# static scan. Needs no credentials and no network. Exits non-zero on the first failure.
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# The project's own CLI configuration: providers from /opt/tf-plugins only.
export TF_CLI_CONFIG_FILE="$root/.terraformrc"
export TF_IN_AUTOMATION=1
# Every directory that is init-ed and tested; modules/global cannot be validated on its own
# (below), envs/production validates it as a child module.
dirs=(modules/region modules/global envs/production)

step() {
  local name="$1" start
  shift
  start=$SECONDS
  echo "== $name"
  "$@"
  echo "   $name: $((SECONDS - start)) s"
}

in_dirs() {
  local d
  for d in "${dirs[@]}"; do
    echo "-- $d"
    (cd "$root/$d" && "$@")
  done
}

validate() {
  local d
  for d in modules/region envs/production; do
    echo "-- $d"
    (cd "$root/$d" && terraform validate -no-color)
  done
  # A module that declares configuration_aliases (aws.us_east_1) cannot be validated without a
  # caller that passes that provider: terraform validate in modules/global reports "Provider
  # configuration not present". envs/production passes it, so its validate covers the module,
  # and the module's own terraform test validates it with mocked providers.
  echo "-- modules/global: validated through envs/production and its tests"
}

step "terraform fmt" terraform fmt -check -recursive -diff "$root"
# -lockfile=readonly: a provider whose checksum differs from .terraform.lock.hcl is refused
# rather than recorded.
step "terraform init" in_dirs terraform init -backend=false -input=false -lockfile=readonly -no-color
step "terraform validate" validate
step "terraform test" in_dirs terraform test -no-color
step "bad input messages" python3 "$root/tests/bad_input.py" "${dirs[@]/#/$root/}"
if [[ -n "${CHECKOV:-}" ]]; then
  step "checkov" "$CHECKOV" -d "$root" --framework terraform --skip-download --compact --quiet
else
  echo "== checkov: NOT RUN (set CHECKOV to a checkov binary; see README.md)"
fi
