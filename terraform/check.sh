#!/usr/bin/env bash
# The offline checks of terraform/ (README.md, "Checking it offline"): fmt, init from the filesystem
# mirror against the committed lock files, validate, the plan-time tests with a mocked AWS provider, the
# bad-input messages and checkov. One harness runs them, the terraform part of `make deploy-check`.
set -euo pipefail
exec "$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)/deploy/tools/check.sh" terraform "$@"
