# Firstmile: `make run` serves the demo on embedded defaults; `make test` runs everything.
SHELL := /bin/bash
.DEFAULT_GOAL := help
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
WEB_BUNDLE := platform/firstmile/web/analytics.bundle.js
EMBED_BUNDLE := platform/firstmile/embed/firstmile.js
TRACKING_CLIENTS := tests/clients/node_modules/.installed
PG := deploy/local/postgres.sh
KAFKA := deploy/local/kafka.sh
REDIS := deploy/local/redis.sh
KEYCLOAK := deploy/local/keycloak.sh
CHROMIUM := deploy/local/chromium.sh
MAILPIT := deploy/local/mailpit.sh
RAY := deploy/local/ray.sh
WRK := deploy/local/wrk.sh
BENCH_REGISTRY := .firstmile/bench-registry
BENCH_MODELS := .firstmile/bench-models/registry
PYTEST_WORKERS ?= 2

.PHONY: help run install web tracking-clients test lint typecheck sdk-test pytest services services-stop bench bench-security bench-analytics bench-events bench-inference bench-planner bench-admin bench-nudges bench-experiments bench-destinations bench-tenant-training clean

help: ## Show the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-14s %s\n", $$1, $$2}'

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	@test -x $(BIN)/uv || $(BIN)/pip install -q uv
	$(BIN)/uv pip install --python $(BIN)/python -q -e '.[inference,dev]'
	@touch $(STAMP)

$(WEB_BUNDLE): web/package.json web/package-lock.json $(wildcard web/src/*.js)
	cd web && npm ci --no-audit --no-fund --silent
	web/node_modules/.bin/esbuild web/src/analytics.js --bundle --minify --format=esm --target=es2020 \
	  --legal-comments=eof --log-level=warning --outfile=$(WEB_BUNDLE)

$(EMBED_BUNDLE): sdk/embed/package.json sdk/embed/package-lock.json sdk/embed/tsconfig.json $(wildcard sdk/embed/src/*.ts) $(wildcard sdk/embed/scripts/*.mjs)
	cd sdk/embed && npm ci --no-audit --no-fund --silent && npm run --silent build

# The official Node.js tracking libraries (Segment's, RudderStack's) that tests/integration/test_tracking_clients.py
# drives against the ingestion API: installed from the committed lock when it changed
$(TRACKING_CLIENTS): tests/clients/package.json tests/clients/package-lock.json
	cd tests/clients && npm ci --no-audit --no-fund --silent
	@touch $(TRACKING_CLIENTS)

tracking-clients: $(TRACKING_CLIENTS) ## Install the Node.js tracking libraries the tests drive (tests/clients, npm ci from its lock)

web: $(WEB_BUNDLE) $(EMBED_BUNDLE) ## Build the admin UI bundle (Chart.js from npm) and the embed SDK (sdk/embed, TypeScript) with esbuild when their sources changed

install: $(STAMP) $(WEB_BUNDLE) $(EMBED_BUNDLE) ## Create .venv and install Firstmile with its dev tools, build the admin UI's bundle (idempotent)

run: $(STAMP) $(WEB_BUNDLE) $(EMBED_BUNDLE) ## Migrate the embedded PostgreSQL, apply tenants/demo.yaml, print a demo key, serve on 127.0.0.1:8000 (nudge e-mail to a local Mailpit)
	@$(MAILPIT) start run && echo "nudge e-mails: $$($(MAILPIT) api run) (Mailpit)" || echo "Mailpit did not start: no e-mail nudges"
	FIRSTMILE_NUDGE_SMTP_URL=$${FIRSTMILE_NUDGE_SMTP_URL:-$$($(MAILPIT) url run)} \
	  FIRSTMILE_NUDGE_IN_APP=$${FIRSTMILE_NUDGE_IN_APP:-off} $(BIN)/firstmile dev

services: ## Install (apt) and start the PostgreSQL, Kafka, Redis, Keycloak and Mailpit the tests use; install Chromium
	@$(CHROMIUM) install
	@$(CHROMIUM) axe >/dev/null
	@$(PG) start test
	@$(KAFKA) start test
	@$(REDIS) start test
	@$(KEYCLOAK) start test
	@$(MAILPIT) start test

services-stop: ## Stop the test services
	@$(MAILPIT) stop test
	@$(KEYCLOAK) stop test
	@$(REDIS) stop test
	@$(KAFKA) stop test
	@$(PG) stop test

lint: $(STAMP) ## ruff check and format check, and the import-linter contracts of the layers (docs/architecture.md)
	$(BIN)/ruff check platform inference tests benchmarks
	$(BIN)/ruff format --check platform inference tests benchmarks
	$(BIN)/lint-imports

typecheck: $(STAMP) ## mypy --strict on the packages, benchmarks and tests
	$(BIN)/mypy

sdk-test: $(EMBED_BUNDLE) ## The embed SDK's own checks (sdk/embed): tsc --noEmit, its vitest unit tests, the bundle size budget
	cd sdk/embed && npm run --silent typecheck && npm test --silent && npm run --silent size

pytest: $(STAMP) $(WEB_BUNDLE) $(EMBED_BUNDLE) $(TRACKING_CLIENTS) services ## The test suite (PostgreSQL must be running: make services)
	FIRSTMILE_TEST_ADMIN_URL=$$($(PG) url test) FIRSTMILE_TEST_KAFKA=$$($(KAFKA) url test) FIRSTMILE_TEST_KAFKA_SASL=$$($(KAFKA) sasl-url test) \
	  FIRSTMILE_TEST_REDIS=$$($(REDIS) url test) FIRSTMILE_TEST_KEYCLOAK=$$($(KEYCLOAK) url test) \
	  FIRSTMILE_TEST_CHROMIUM=$$($(CHROMIUM) path) FIRSTMILE_TEST_AXE=$$($(CHROMIUM) axe) FIRSTMILE_TEST_MAILPIT_SMTP=$$($(MAILPIT) url test) \
	  FIRSTMILE_TEST_MAILPIT_API=$$($(MAILPIT) api test) \
	  $(BIN)/pytest -n $(PYTEST_WORKERS) --dist loadgroup

test: $(STAMP) $(WEB_BUNDLE) $(EMBED_BUNDLE) $(TRACKING_CLIENTS) ## Everything the tests need, then ruff, mypy, the whole suite and the deployment checks
	@mkdir -p .firstmile
	@# The deployment tools build (cold: about 25 min of Go, niced) while the services start and the suite runs
	@deploy/tools/install.sh all >.firstmile/tools.log 2>&1 & echo $$! >.firstmile/tools.pid
	@$(CHROMIUM) install
	@$(CHROMIUM) axe >/dev/null
	@$(PG) start test
	@$(KAFKA) start test
	@$(REDIS) start test
	@$(KEYCLOAK) start test
	@$(MAILPIT) start test
	@status=0; \
	  $(MAKE) --no-print-directory lint typecheck sdk-test || status=$$?; \
	  if [ $$status -eq 0 ]; then \
	    FIRSTMILE_TEST_ADMIN_URL=$$($(PG) url test) FIRSTMILE_TEST_KAFKA=$$($(KAFKA) url test) FIRSTMILE_TEST_KAFKA_SASL=$$($(KAFKA) sasl-url test) \
	      FIRSTMILE_TEST_REDIS=$$($(REDIS) url test) FIRSTMILE_TEST_KEYCLOAK=$$($(KEYCLOAK) url test) \
	      FIRSTMILE_TEST_CHROMIUM=$$($(CHROMIUM) path) FIRSTMILE_TEST_AXE=$$($(CHROMIUM) axe) FIRSTMILE_TEST_MAILPIT_SMTP=$$($(MAILPIT) url test) \
	      FIRSTMILE_TEST_MAILPIT_API=$$($(MAILPIT) api test) \
	      $(BIN)/pytest -n $(PYTEST_WORKERS) --dist loadgroup || status=$$?; \
	  fi; \
	  $(MAILPIT) stop test; $(KEYCLOAK) stop test; $(REDIS) stop test; $(KAFKA) stop test; $(PG) stop test; \
	  tools=0; while kill -0 $$(cat .firstmile/tools.pid) 2>/dev/null; do \
	    [ $$tools -eq 0 ] && echo "waiting for the deployment tools (.firstmile/tools.log)"; tools=1; sleep 5; done; \
	  if deploy/tools/install.sh all >>.firstmile/tools.log 2>&1; then \
	    deploy/tools/check.sh all || status=$$?; \
	  else tail -40 .firstmile/tools.log; echo "the deployment tools did not build (.firstmile/tools.log)"; status=1; fi; \
	  exit $$status

bench: $(STAMP) ## The hot path: bare, start with and without the audit append, complete, production shape, ingest end to end
	@$(WRK) install
	@$(PG) start bench
	@status=0; $(KAFKA) start bench || status=$$?; \
	  if [ $$status -eq 0 ]; then \
	    mkdir -p .firstmile/bench; \
	    FIRSTMILE_BENCH_ADMIN_URL=$$($(PG) url bench) FIRSTMILE_BENCH_KAFKA=$$($(KAFKA) url bench) \
	      $(BIN)/python -m benchmarks api --output .firstmile/bench/api.md >/dev/null || status=$$?; \
	    [ $$status -ne 0 ] || FIRSTMILE_BENCH_ADMIN_URL=$$($(PG) url bench) FIRSTMILE_BENCH_KAFKA=$$($(KAFKA) url bench) \
	      $(BIN)/python -m benchmarks events --phase direct --output .firstmile/bench/ingest.md >/dev/null || status=$$?; \
	    [ $$status -ne 0 ] || cat .firstmile/bench/api.md .firstmile/bench/ingest.md > docs/benchmarks-latest.md; \
	  fi; \
	  $(KAFKA) stop bench; $(PG) stop bench; \
	  [ $$status -ne 0 ] || echo "report: docs/benchmarks-latest.md"; exit $$status

bench-security: $(STAMP) ## Crypto, audit (1M entries) and PII redaction benchmarks (docs/benchmarks.md)
	@$(PG) start bench
	@status=0; url=$$($(PG) url bench); \
	  FIRSTMILE_BENCH_ADMIN_URL=$$url $(BIN)/python -m benchmarks crypto || status=$$?; \
	  FIRSTMILE_BENCH_ADMIN_URL=$$url $(BIN)/python -m benchmarks audit || status=$$?; \
	  $(BIN)/python -m benchmarks pii || status=$$?; \
	  $(PG) stop bench; exit $$status

bench-events: $(STAMP) ## Event path: relay vs bare producer, end to end (Kafka, embedded), freshness
	@$(PG) start bench
	@status=0; $(KAFKA) start bench || status=$$?; \
	  if [ $$status -eq 0 ]; then \
	    FIRSTMILE_BENCH_ADMIN_URL=$$($(PG) url bench) FIRSTMILE_BENCH_KAFKA=$$($(KAFKA) url bench) \
	      $(BIN)/python -m benchmarks events --output docs/benchmarks-latest.md || status=$$?; \
	  fi; \
	  $(KAFKA) stop bench; $(PG) stop bench; exit $$status

bench-analytics: $(STAMP) ## Analytics queries over 10M synthetic events (chdb)
	$(BIN)/python -m benchmarks analytics

bench-experiments: $(STAMP) ## Experiment allocations per second, and the analysis over 10M exposures (chdb)
	@mkdir -p .firstmile/bench
	$(BIN)/python -m benchmarks experiments --output .firstmile/bench/experiments.md

bench-inference: $(STAMP) ## Path classifier in-process vs Ray Serve over HTTP, on CPU (docs/serving.md)
	@test -f $(BENCH_REGISTRY)/path_classifier/stages.json || \
	  $(BIN)/python -m firstmile_inference.train --registry $(BENCH_REGISTRY) --sessions 20000 --promote production
	@$(RAY) start bench
	@status=0; \
	  $(RAY) deploy bench $(abspath $(BENCH_REGISTRY)) models=path_classifier min_replicas=1 max_replicas=1 \
	    num_cpus=1 max_batch_size=64 || status=$$?; \
	  if [ $$status -eq 0 ]; then \
	    $(BIN)/python -m benchmarks inference --registry $(BENCH_REGISTRY) --num-gpus 0 \
	      --url $$($(RAY) url bench) --output .firstmile/bench/inference.md || status=$$?; \
	  fi; \
	  $(RAY) stop bench; exit $$status

bench-planner: $(STAMP) ## Path planner: start latency with the model (in-process, Ray Serve) vs the rules
	@pg_port=$$($(PG) url bench | sed -E 's#.*:([0-9]+)/.*#\1#'); \
	  pg_up=; (exec 3<>/dev/tcp/127.0.0.1/$$pg_port) 2>/dev/null && pg_up=1; \
	  ray_up=; $(RAY) status bench >/dev/null 2>&1 && ray_up=1; \
	  cleanup() { [ -n "$$ray_up" ] || $(RAY) stop bench; [ -n "$$pg_up" ] || $(PG) stop bench; }; \
	  trap cleanup EXIT; trap 'exit 130' INT TERM; \
	  set -e; \
	  $(WRK) install; \
	  if ! grep -qs '"production": "' $(BENCH_MODELS)/path_classifier/stages.json; then \
	    $(BIN)/firstmile models train --registry $(BENCH_MODELS) --promote production; \
	  fi; \
	  $(PG) start bench; \
	  $(RAY) start bench; \
	  $(RAY) deploy bench $(abspath $(BENCH_MODELS)) models=path_classifier min_replicas=1 max_replicas=1 \
	    num_cpus=1 max_batch_size=64; \
	  FIRSTMILE_BENCH_ADMIN_URL=$$($(PG) url bench) $(BIN)/python -m benchmarks planner \
	    --registry $(abspath $(BENCH_MODELS)) --inference-url $$($(RAY) url bench) \
	    --output .firstmile/bench/planner.md

bench-admin: $(STAMP) ## Admin UI session auth (in-process, Redis) vs the API key; report in .firstmile/bench/admin.md
	@pg_port=$$($(PG) url bench | sed -E 's#.*:([0-9]+)/.*#\1#'); \
	  pg_up=; (exec 3<>/dev/tcp/127.0.0.1/$$pg_port) 2>/dev/null && pg_up=1; \
	  redis_port=$$($(REDIS) url bench | sed -E 's#.*:([0-9]+)/.*#\1#'); \
	  redis_up=; (exec 3<>/dev/tcp/127.0.0.1/$$redis_port) 2>/dev/null && redis_up=1; \
	  cleanup() { [ -n "$$redis_up" ] || $(REDIS) stop bench; [ -n "$$pg_up" ] || $(PG) stop bench; }; \
	  trap cleanup EXIT; trap 'exit 130' INT TERM; \
	  set -e; \
	  $(WRK) install; \
	  $(PG) start bench; \
	  $(REDIS) start bench; \
	  FIRSTMILE_BENCH_ADMIN_URL=$$($(PG) url bench) FIRSTMILE_BENCH_REDIS=$$($(REDIS) url bench) \
	    $(BIN)/python -m benchmarks admin --output .firstmile/bench/admin.md

bench-nudges: $(STAMP) ## Nudge decisions per second and stuck -> delivered into Mailpit; report in .firstmile/bench/nudges.md
	@pg_port=$$($(PG) url bench | sed -E 's#.*:([0-9]+)/.*#\1#'); \
	  pg_up=; (exec 3<>/dev/tcp/127.0.0.1/$$pg_port) 2>/dev/null && pg_up=1; \
	  mp_port=$$($(MAILPIT) api bench | sed -E 's#.*:([0-9]+).*#\1#'); \
	  mailpit_up=; (exec 3<>/dev/tcp/127.0.0.1/$$mp_port) 2>/dev/null && mailpit_up=1; \
	  cleanup() { [ -n "$$mailpit_up" ] || $(MAILPIT) stop bench; [ -n "$$pg_up" ] || $(PG) stop bench; }; \
	  trap cleanup EXIT; trap 'exit 130' INT TERM; \
	  set -e; \
	  $(PG) start bench; \
	  $(MAILPIT) start bench; \
	  FIRSTMILE_BENCH_ADMIN_URL=$$($(PG) url bench) FIRSTMILE_BENCH_MAILPIT_SMTP=$$($(MAILPIT) url bench) \
	    FIRSTMILE_BENCH_MAILPIT_API=$$($(MAILPIT) api bench) \
	    $(BIN)/python -m benchmarks nudges --output .firstmile/bench/nudges.md

bench-destinations: $(STAMP) ## Events/s per destination type (queue + worker) vs the bare official clients; report in .firstmile/bench/destinations.md
	@pg_port=$$($(PG) url bench | sed -E 's#.*:([0-9]+)/.*#\1#'); \
	  pg_up=; (exec 3<>/dev/tcp/127.0.0.1/$$pg_port) 2>/dev/null && pg_up=1; \
	  cleanup() { [ -n "$$pg_up" ] || $(PG) stop bench; }; \
	  trap cleanup EXIT; trap 'exit 130' INT TERM; \
	  set -e; \
	  $(PG) start bench; \
	  FIRSTMILE_BENCH_ADMIN_URL=$$($(PG) url bench) \
	    $(BIN)/python -m benchmarks destinations --output .firstmile/bench/destinations.md

bench-tenant-training: $(STAMP) ## Per-tenant training per 100k logged decisions in process and on Ray vs the same training in memory; report in .firstmile/bench/tenant-training.md
	@pg_port=$$($(PG) url bench | sed -E 's#.*:([0-9]+)/.*#\1#'); \
	  pg_up=; (exec 3<>/dev/tcp/127.0.0.1/$$pg_port) 2>/dev/null && pg_up=1; \
	  ray_up=; $(RAY) status bench >/dev/null 2>&1 && ray_up=1; \
	  cleanup() { [ -n "$$ray_up" ] || $(RAY) stop bench; [ -n "$$pg_up" ] || $(PG) stop bench; }; \
	  trap cleanup EXIT; trap 'exit 130' INT TERM; \
	  set -e; \
	  $(PG) start bench; \
	  $(RAY) start bench; \
	  FIRSTMILE_BENCH_ADMIN_URL=$$($(PG) url bench) FIRSTMILE_BENCH_RAY_ADDRESS=127.0.0.1:$${FIRSTMILE_BENCH_RAY_PORT:-57200} \
	    RAY_AUTH_MODE=token RAY_AUTH_TOKEN_PATH=$(CURDIR)/.firstmile/services/ray-bench/auth_token \
	    nice -n 10 $(BIN)/python -m benchmarks tenant-training --output .firstmile/bench/tenant-training.md

clean: ## Remove the venv and all local state (embedded database included)
	-$(PG) stop test; $(PG) stop bench; $(KAFKA) stop test; $(KAFKA) stop bench; $(REDIS) stop test; $(REDIS) stop bench
	-$(KEYCLOAK) stop test; $(KEYCLOAK) stop dev
	-$(RAY) stop test; $(RAY) stop bench; $(RAY) stop dev
	-test -x $(BIN)/firstmile && $(BIN)/firstmile embedded stop
	rm -rf $(VENV) .firstmile .mypy_cache .ruff_cache .pytest_cache .import_linter_cache

# ---- Offline deployment checks (deploy/tools/README.md); tools build once into $(FIRSTMILE_TOOLS) ----
.PHONY: tools deploy-check deploy-check-images deploy-check-helm deploy-check-rules deploy-check-terraform deploy-check-selftest

# helm, helm-unittest, kubeconform, kube-score, promtool, etcd, kube-apiserver, kubectl, the Python tools and
# the schemas, into ~/.cache/firstmile-tools
tools: ## Build the deployment tools once (cold about 25 minutes on 2 cores, silent when warm)
	@deploy/tools/install.sh all

deploy-check: tools ## Every deployment check offline: hadolint, helm, kubeconform, API server dry-run, kube-score, checkov, promtool, terraform
	@deploy/tools/check.sh all

# Each part alone; check.sh installs only the tools that part runs
deploy-check-images deploy-check-helm deploy-check-rules deploy-check-terraform deploy-check-selftest:
	@deploy/tools/check.sh $(@:deploy-check-%=%)

# ---- The cost model (docs/cost.md): deploy/cost/prices.yaml and usage.yaml, priced by benchmarks/cost.py ----
.PHONY: cost

cost: $(STAMP) ## Cost per user, per 1k events and per 1k inferences against the design's targets (docs/cost.md)
	$(BIN)/python -m benchmarks cost --write

# ---- Container images (deploy/docker/README.md): firstmile-api and firstmile-inference ----
.PHONY: images

images: $(WEB_BUNDLE) $(EMBED_BUNDLE) ## Build both images on a debootstrapped Debian base (private dockerd when no engine runs), smoke-check them
	@deploy/docker/images.sh
