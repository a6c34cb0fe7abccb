#!/usr/bin/env bash
# The offline deployment checks (deploy/tools/README.md says what each one proves).
#   deploy/tools/check.sh [all|images|helm|rules|terraform|selftest]...     (default: all)
# One line per check; a failing check prints its output. A part whose inputs do not exist yet prints
# `MISSING: <what>` and fails the run: nothing is skipped silently. Exit status 1 when anything failed.
# Inputs (overridable, e.g. to try the harness on a scratch chart):
#   FIRSTMILE_CHART (helm/firstmile)  FIRSTMILE_TERRAFORM (terraform)  FIRSTMILE_DOCKER_DIR (deploy/docker)
#   FIRSTMILE_PROMETHEUS_TESTS (deploy/prometheus/tests)
# FIRSTMILE_CHECK_KEEP=1 keeps the work directory (renderings, extracted rules, logs) even when all passed.
set -uo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
repo=$(cd "$here/../.." && pwd)
# shellcheck source=versions.env
. "$here/versions.env"
CHART=${FIRSTMILE_CHART:-$repo/helm/firstmile}
TERRAFORM=${FIRSTMILE_TERRAFORM:-$repo/terraform}
DOCKER_DIR=${FIRSTMILE_DOCKER_DIR:-$repo/deploy/docker}
PROM_TESTS=${FIRSTMILE_PROMETHEUS_TESTS:-$repo/deploy/prometheus/tests}
TESTDATA=$here/testdata
KUBE_SCORE_IGNORES=$here/kube-score-ignores.txt
RELEASE=firstmile
NAMESPACE=firstmile
# The rule file the promtool unit tests name in `rule_files:` (README: "Rule unit tests").
RULES_FILE=firstmile.rules.yaml

# The tools each part runs (install.sh builds what is missing; when warm it only looks).
tools_for() {
  case "$1" in
    images | terraform) echo python ;;
    rules) echo helm promtool python ;;
    helm | selftest) echo all ;;
  esac
}
eval "$("$here/install.sh" env)"
PY="$("$here/install.sh" path python)/python"
SCHEMAS=$FIRSTMILE_SCHEMAS
export TF_CLI_CONFIG_FILE=$TERRAFORM/.terraformrc
export TF_IN_AUTOMATION=1 CHECKPOINT_DISABLE=1
# checkov: no calls home, no update check.
export BC_SKIP_MAPPING=TRUE CHECKOV_SKIP_PACKAGE_UPDATE=1 ANSI_COLORS_DISABLED=1 NO_COLOR=1

WORK=$(mktemp -d "${TMPDIR:-/tmp}/firstmile-deploy-check.XXXXXX")
APISERVER_STATE=$WORK/apiserver
apiserver_started=
FAILED=()

cleanup() {
  if [ -n "$apiserver_started" ]; then
    FIRSTMILE_APISERVER_STATE=$APISERVER_STATE "$here/apiserver.sh" stop
  fi
  if [ ${#FAILED[@]} -eq 0 ] && [ -z "${FIRSTMILE_CHECK_KEEP:-}" ]; then
    rm -rf "$WORK"
  else
    echo "work directory (renderings, logs): $WORK"
  fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM

rel() { echo "${1#"$repo"/}"; }

# step NAME CMD...: runs CMD, one line when it passes, its output when it fails.
step() {
  local name=$1 log start
  shift
  log="$WORK/logs/$(echo "$name" | sed 's/[^A-Za-z0-9._-]/_/g').log"
  mkdir -p "$WORK/logs"
  start=$SECONDS
  if "$@" >"$log" 2>&1; then
    printf '  ok    %-66s %4ss\n' "$name" "$((SECONDS - start))"
    return 0
  fi
  printf '  FAIL  %-66s %4ss\n' "$name" "$((SECONDS - start))"
  tail -n 60 "$log" | sed 's/^/        /'
  FAILED+=("$name")
  return 1
}

# expect_failure NAME PATTERN CMD...: CMD must fail and say PATTERN (an extended regex), which proves the
# gate can fail and fails for the reason meant, not for a broken setup.
expect_failure() {
  local name=$1 pattern=$2
  shift 2
  step "$name" _expect_failure "$pattern" "$@"
}
_expect_failure() {
  local pattern=$1 out status
  shift
  out=$("$@" 2>&1)
  status=$?
  printf '%s\n' "$out"
  if [ "$status" -eq 0 ]; then
    echo ">> expected a failure, the command passed"
    return 1
  fi
  if ! grep -Eq -- "$pattern" <<<"$out"; then
    echo ">> it failed (status $status) but did not say: $pattern"
    return 1
  fi
}

missing() {
  printf '  MISSING: %s\n' "$1"
  FAILED+=("MISSING: $1")
}

section() { printf '%s\n' "$1"; }

# ---- images ---------------------------------------------------------------------------------------------

hadolint_config() {
  if [ -f "$repo/.hadolint.yaml" ]; then echo --config "$repo/.hadolint.yaml"; fi
}

check_images() {
  section "images: hadolint $(rel "$DOCKER_DIR")"
  local files=() f
  for f in "$DOCKER_DIR"/*Dockerfile*; do [ -f "$f" ] && files+=("$f"); done
  if [ ${#files[@]} -eq 0 ]; then
    missing "$(rel "$DOCKER_DIR")/*Dockerfile*"
    return
  fi
  [ -f "$repo/.hadolint.yaml" ] || echo "  note: no .hadolint.yaml, hadolint's defaults apply"
  for f in "${files[@]}"; do
    # shellcheck disable=SC2046
    step "hadolint $(rel "$f")" hadolint --no-color $(hadolint_config) "$f"
  done
}

# ---- helm -----------------------------------------------------------------------------------------------

# Names of the value sets: "default" and each ci/<name>-values.yaml.
value_sets() {
  echo default
  local f
  for f in "$CHART"/ci/*-values.yaml; do
    [ -f "$f" ] && basename "$f" -values.yaml
  done
}

values_args() {
  [ "$1" = default ] || echo "-f $CHART/ci/$1-values.yaml"
}

# The objects behind `.Capabilities.APIVersions.Has` guards exist in the dry-run server too.
render() {
  # shellcheck disable=SC2046
  helm template "$RELEASE" "$CHART" --namespace "$NAMESPACE" $(values_args "$1") \
    --kube-version "$KUBERNETES_VERSION" --api-versions monitoring.coreos.com/v1 --api-versions ray.io/v1 \
    >"$WORK/render/$1.yaml"
}

kubeconform_check() {
  kubeconform -strict -summary \
    -schema-location "$SCHEMAS/kubernetes/{{.ResourceKind}}{{.KindSuffix}}.json" \
    -schema-location "$SCHEMAS/crds/{{.Group}}-{{.ResourceKind}}_{{.ResourceAPIVersion}}.json" "$@"
}

kube_score_check() {
  local ignores
  ignores=$("$PY" "$here/manifests.py" ignore-file "$KUBE_SCORE_IGNORES") || return 1
  "$PY" "$here/manifests.py" kube-score-ignores "$1" || return 1
  # Only CRITICAL fails the check (kube-score's exit status); warnings are printed in the log.
  kube-score score --output-format ci --kubernetes-version "${KUBERNETES_VERSION%.*}" \
    --enable-optional-test container-seccomp-profile ${ignores:+--ignore-test "$ignores"} "$1" |
    { grep -v '^\[OK\]\|^\[SKIPPED\]' || true; }
}

start_apiserver() {
  [ -n "$apiserver_started" ] && return 0
  FIRSTMILE_APISERVER_STATE=$APISERVER_STATE "$here/apiserver.sh" start || return 1
  apiserver_started=1
  export KUBECONFIG=$APISERVER_STATE/kubeconfig
  # The CRDs are applied for real (server-side: the Prometheus CRDs are too big for the
  # last-applied annotation), then the namespace the release goes to.
  kubectl apply --server-side -f "$SCHEMAS/crd-yaml/kuberay" -f "$SCHEMAS/crd-yaml/prometheus-operator" &&
    kubectl wait --for condition=Established --timeout 120s crd --all &&
    kubectl create namespace "$NAMESPACE"
}

dry_run() {
  kubectl apply --dry-run=server --validate=strict --warnings-as-errors --namespace "$NAMESPACE" -f "$1"
}

checkov_k8s() {
  checkov --framework kubernetes --skip-download --quiet --compact -d "$1"
}

check_helm() {
  section "helm: $(rel "$CHART")"
  if [ ! -f "$CHART/Chart.yaml" ]; then
    missing "$(rel "$CHART")/Chart.yaml"
    return
  fi
  local sets=() s
  mapfile -t sets < <(value_sets)
  [ ${#sets[@]} -gt 1 ] || missing "$(rel "$CHART")/ci/*-values.yaml"
  [ -f "$CHART/values.schema.json" ] || missing "$(rel "$CHART")/values.schema.json"

  for s in "${sets[@]}"; do
    # shellcheck disable=SC2046
    step "helm lint --strict ($s values)" helm lint --strict "$CHART" $(values_args "$s")
  done
  # A values schema that rejects unknown keys and wrong types, naming the key.
  expect_failure "helm lint rejects an unknown key (testdata/unknown-key-values.yaml)" 'replicaCountTypo' \
    helm lint --strict "$CHART" -f "$TESTDATA/unknown-key-values.yaml"
  expect_failure "helm lint rejects a wrong type (testdata/wrong-type-values.yaml)" 'api[./]replicaCount' \
    helm lint --strict "$CHART" -f "$TESTDATA/wrong-type-values.yaml"

  if compgen -G "$CHART/tests/*_test.yaml" >/dev/null; then
    step "helm unittest" helm unittest "$CHART"
  else
    missing "$(rel "$CHART")/tests/*_test.yaml (helm-unittest suites)"
  fi

  mkdir -p "$WORK/render"
  local rendered=()
  for s in "${sets[@]}"; do
    step "helm template ($s values)" render "$s" && rendered+=("$s")
  done
  for s in "${rendered[@]}"; do
    step "kubeconform -strict ($s)" kubeconform_check "$WORK/render/$s.yaml"
  done
  for s in "${rendered[@]}"; do
    step "kube-score, no CRITICAL ($s)" kube_score_check "$WORK/render/$s.yaml"
  done
  if [ ${#rendered[@]} -gt 0 ]; then
    if step "apiserver $KUBERNETES_VERSION: start, CRDs, namespace" start_apiserver; then
      for s in "${rendered[@]}"; do
        step "kubectl apply --dry-run=server ($s)" dry_run "$WORK/render/$s.yaml"
      done
    fi
    step "checkov kubernetes (all renderings)" checkov_k8s "$WORK/render"
  fi
}

# ---- rules ----------------------------------------------------------------------------------------------

check_rules() {
  section "rules: PrometheusRules of $(rel "$CHART") (default values), tests in $(rel "$PROM_TESTS")"
  if [ ! -f "$CHART/Chart.yaml" ]; then
    missing "$(rel "$CHART")/Chart.yaml"
    return
  fi
  local dir=$WORK/rules t
  mkdir -p "$WORK/render" "$dir"
  [ -f "$WORK/render/default.yaml" ] || step "helm template (default values)" render default || return
  step "extract PrometheusRule groups -> $RULES_FILE" \
    "$PY" "$here/manifests.py" rules "$WORK/render/default.yaml" "$dir/$RULES_FILE" || return
  step "promtool check rules" promtool check rules "$dir/$RULES_FILE"
  local tests=()
  for t in "$PROM_TESTS"/*.yaml "$PROM_TESTS"/*.yml; do [ -f "$t" ] && tests+=("$t"); done
  if [ ${#tests[@]} -eq 0 ]; then
    missing "$(rel "$PROM_TESTS")/*.yaml (promtool rule unit tests)"
    return
  fi
  # promtool resolves rule_files relative to the test file: each test runs from a copy beside the
  # extracted rules, so `rule_files: [firstmile.rules.yaml]` is the one way a test names them.
  for t in "${tests[@]}"; do
    cp "$t" "$dir/"
    step "promtool test rules $(rel "$t")" promtool test rules "$dir/$(basename "$t")"
  done
}

# ---- terraform ------------------------------------------------------------------------------------------

tf() {
  local dir=$1
  shift
  # .terraform goes to the work directory, not the tree; -lockfile=readonly: the committed
  # .terraform.lock.hcl must already pin what init installs.
  TF_DATA_DIR="$WORK/tf/$(echo "$dir" | tr '/' '_')" terraform -chdir="$dir" "$@"
}

# `terraform validate` in a module that declares configuration_aliases fails with "Provider configuration
# not present" (hashicorp/terraform#28490, open): it wants a provider block for each alias, which a module
# must not have (its caller passes them). So such a module is validated as a copy in the work directory
# with an empty `provider "<name>" { alias = "<alias>" }` block per declared alias; the tree is not touched.
tf_validate() {
  local dir=$1
  local aliases
  aliases=$(grep -ho 'configuration_aliases *= *\[[^]]*\]' "$dir"/*.tf 2>/dev/null |
    sed 's/.*\[\(.*\)\]/\1/' | tr ',' '\n' | tr -d ' ' | grep -E '^[a-z0-9_-]+\.[A-Za-z0-9_-]+$' | sort -u)
  if [ -z "$aliases" ]; then
    tf "$dir" validate -no-color
    return
  fi
  local copy
  copy="$WORK/validate/$(echo "$dir" | tr '/' '_')"
  rm -rf "$copy" && mkdir -p "$copy"
  cp "$dir"/*.tf "$dir"/.terraform.lock.hcl "$copy"/
  local a
  for a in $aliases; do
    printf 'provider "%s" {\n  alias = "%s"\n}\n' "${a%%.*}" "${a#*.}" >>"$copy/zz_validate_aliases.tf"
  done
  echo "validating a copy with provider blocks for: $(echo "$aliases" | tr '\n' ' ')"
  tf "$copy" init -backend=false -input=false -lockfile=readonly -no-color >/dev/null &&
    tf "$copy" validate -no-color
}

terraform_tests() {
  local dir=$1 out
  out=$(tf "$dir" test -no-color 2>&1)
  local status=$?
  printf '%s\n' "$out"
  [ "$status" -eq 0 ] || return "$status"
  # `terraform test` passes with nothing to run; a module must prove its guarantees.
  if grep -Eq '(^| )0 passed, 0 failed' <<<"$out"; then
    echo ">> no test ran"
    return 1
  fi
}

check_terraform() {
  section "terraform: $(rel "$TERRAFORM") (CLI config $(rel "$TF_CLI_CONFIG_FILE"))"
  if [ ! -f "$TF_CLI_CONFIG_FILE" ]; then
    missing "$(rel "$TF_CLI_CONFIG_FILE") (provider_installation with the /opt/tf-plugins filesystem mirror)"
    return
  fi
  local dirs=() d
  for d in "$TERRAFORM"/modules/*/ "$TERRAFORM"/envs/*/; do [ -d "$d" ] && dirs+=("${d%/}"); done
  compgen -G "$TERRAFORM/modules/*/" >/dev/null || missing "$(rel "$TERRAFORM")/modules/*"
  compgen -G "$TERRAFORM/envs/*/" >/dev/null || missing "$(rel "$TERRAFORM")/envs/*"
  [ ${#dirs[@]} -gt 0 ] || return
  for d in "${dirs[@]}"; do
    local name
    name=$(rel "$d")
    step "terraform fmt -check -recursive $name" terraform -chdir="$d" fmt -check -recursive -diff -no-color
    step "terraform init -backend=false $name" tf "$d" init -backend=false -input=false -lockfile=readonly -no-color || continue
    step "terraform validate $name" tf_validate "$d"
    if compgen -G "$d/*.tftest.hcl" >/dev/null || compgen -G "$d/tests/*.tftest.hcl" >/dev/null; then
      step "terraform test $name" terraform_tests "$d"
      if grep -qs 'expect_failures *= *\[var\.' "$d"/*.tftest.hcl "$d"/tests/*.tftest.hcl; then
        # Bad input fails with the message its variable declares (terraform test hides it).
        step "terraform bad input messages $name" \
          env TF_DATA_DIR="$WORK/tf/$(echo "$d" | tr '/' '_')" python3 "$TERRAFORM/tests/bad_input.py" "$d"
      fi
    else
      missing "$name/tests/*.tftest.hcl (terraform test with mock_provider)"
    fi
  done
  step "checkov terraform $(rel "$TERRAFORM")" \
    checkov --framework terraform --skip-download --quiet --compact -d "$TERRAFORM"
}

# ---- selftest: every gate can fail, for the right reason ------------------------------------------------

check_selftest() {
  section "selftest: each gate rejects a known-bad input (deploy/tools/testdata/selftest)"
  local st=$TESTDATA/selftest
  # shellcheck disable=SC2046
  expect_failure "hadolint rejects bad.Dockerfile (DL3007 latest tag)" 'DL3007' \
    hadolint --no-color $(hadolint_config) "$st/bad.Dockerfile"
  expect_failure "kubeconform rejects an unknown field" "additional properties 'imagePullPolice' not allowed" \
    kubeconform_check "$st/kubeconform-reject.yaml"
  expect_failure "kubeconform rejects a misspelt RayService field (CRD schema)" "additional properties 'rayClusterConfg' not allowed" \
    kubeconform_check "$st/crd-reject.yaml"
  step "kubeconform accepts selector-mismatch.yaml (the schemas cannot see it)" \
    kubeconform_check "$st/selector-mismatch.yaml"
  if step "apiserver $KUBERNETES_VERSION: start, CRDs, namespace" start_apiserver; then
    expect_failure "apiserver rejects a Deployment whose selector misses its labels" \
      'selector.*does not match template .*labels' dry_run "$st/selector-mismatch.yaml"
  fi
  expect_failure "kube-score flags CRITICAL (no resources)" 'CRITICAL.*(CPU|Memory) limit is not set' \
    kube_score_check "$st/selector-mismatch.yaml"
  expect_failure "checkov rejects a privileged container (CKV_K8S_16)" 'CKV_K8S_16' \
    checkov --framework kubernetes --skip-download --quiet --compact -f "$st/privileged.yaml"
  expect_failure "promtool check rules rejects a bad expression" 'could not parse expression|parse error' \
    promtool check rules "$st/bad.rules.yaml"
  expect_failure "promtool test rules fails a wrong expectation" 'FAILED' \
    promtool test rules "$st/failing_test.yaml"
  local tfdir=$WORK/selftest-terraform
  mkdir -p "$tfdir" && cp "$st/invalid.tf" "$tfdir/main.tf"
  expect_failure "terraform validate rejects an unsupported argument" 'Unsupported argument' \
    bash -c 'terraform -chdir="$1" init -backend=false -input=false -no-color >/dev/null &&
      terraform -chdir="$1" validate -no-color' _ "$tfdir"
}

# ---------------------------------------------------------------------------------------------------------

# One compound command, parsed whole before it runs: editing this file during a run cannot change the run.
{
parts=("$@")
[ ${#parts[@]} -gt 0 ] || parts=(all)
if [ "${parts[0]}" = all ]; then parts=(images helm rules terraform selftest); fi
for p in "${parts[@]}"; do
  case "$p" in
    images | helm | rules | terraform | selftest) ;;
    *) echo "usage: $0 [all|images|helm|rules|terraform|selftest]..." >&2; exit 2 ;;
  esac
done
# shellcheck disable=SC2046
"$here/install.sh" $(for p in "${parts[@]}"; do tools_for "$p"; done | tr ' ' '\n' | sort -u) || exit 1
started=$SECONDS
for p in "${parts[@]}"; do "check_$p"; done
if [ ${#FAILED[@]} -gt 0 ]; then
  printf 'deploy-check FAILED (%s) in %ss:\n' "${parts[*]}" "$((SECONDS - started))"
  printf '  - %s\n' "${FAILED[@]}"
  exit 1
fi
printf 'deploy-check passed (%s) in %ss\n' "${parts[*]}" "$((SECONDS - started))"
exit 0
}
