#!/usr/bin/env bash
# Debian's Chromium, the browser of the end-to-end tests (Playwright drives it; it never downloads one).
#   deploy/local/chromium.sh install   install the Debian package if missing (idempotent)
#   deploy/local/chromium.sh path      print the browser binary (what FIRSTMILE_TEST_CHROMIUM is set to)
#   deploy/local/chromium.sh axe       install axe-core (npm, pinned, once into the tools cache) and print its
#                                      axe.min.js, which the browser tests inject to check accessibility
# apt-get update runs only when apt does not know the package yet (a fresh machine's empty lists), or when
# installing from the lists at hand failed (stale lists name versions the mirror no longer has).
# --no-install-recommends: headless tests need no fonts beyond the ones Chromium depends on, no extensions.
set -euo pipefail

cmd=${1:-install}
AXE_VERSION=4.10.3
AXE_DIR=${FIRSTMILE_TOOLS_CACHE:-$HOME/.cache/firstmile-tools}/axe-core-$AXE_VERSION
AXE_JS=$AXE_DIR/node_modules/axe-core/axe.min.js

binary() {
  command -v chromium 2>/dev/null || true
}

case "$cmd" in
  path)
    found=$(binary)
    if [ -z "$found" ]; then echo "chromium is not installed: deploy/local/chromium.sh install" >&2; exit 1; fi
    echo "$found"
    ;;
  install)
    if [ -n "$(binary)" ]; then exit 0; fi
    echo "installing Chromium from Debian packages" >&2
    export DEBIAN_FRONTEND=noninteractive
    install_chromium() { apt-get install -y -qq --no-install-recommends chromium >/dev/null; }
    if ! apt-cache show chromium >/dev/null 2>&1; then apt-get update -qq; fi
    install_chromium || { apt-get update -qq && install_chromium; }
    if [ -z "$(binary)" ]; then echo "chromium was installed but is not on PATH" >&2; exit 1; fi
    ;;
  axe)
    if [ ! -s "$AXE_JS" ]; then
      echo "installing axe-core $AXE_VERSION from npm into $AXE_DIR" >&2
      mkdir -p "$AXE_DIR"
      npm install --prefix "$AXE_DIR" --no-audit --no-fund --silent "axe-core@$AXE_VERSION" >&2
    fi
    echo "$AXE_JS"
    ;;
  *)
    echo "usage: $0 install|path|axe" >&2; exit 2
    ;;
esac
