# tetherfed: `make demo` runs a local ensemble, `make test` runs every check. Both bootstrap .venv.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-$(shell cksum pyproject.toml | cut -d' ' -f1)
TORCH_CPU ?= torch==2.13.0

.PHONY: venv test lint unit notorch docs docs-build demo bench bench-quick bench-peers clean fuzz fuzz-ci chaos browser

venv: $(STAMP)

# --system-site-packages lets a GPU user's own torch build (installed first) be used as is;
# only when no torch is importable do we install the CPU build.
$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv --system-site-packages $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q $(TORCH_CPU)
	$(PY) -m pip install -q -e '.[worker,test,slurm,ray,docs]'
	rm -f $(VENV)/.installed-*
	touch $@

# Tools run as modules: with --system-site-packages a tool already installed system-wide has no
# script in .venv/bin.
lint: venv
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .
	$(PY) -m mypy tether_protocol services/coordinator/tetherfed_coordinator clients/python/tetherfed
	# import-linter's contracts (pyproject.toml): the client package's concerns import one way,
	# the coordinator imports no client code, and the SDK needs no torch.
	$(PY) -c "from importlinter.cli import lint_imports_command; lint_imports_command()"

unit: venv browser
	$(PY) -m pytest -q
	# The coordinator's API tests again, on a three-primary Redis Cluster started on loopback.
	TETHERFED_TEST_REDIS=cluster $(PY) -m pytest -q tests/coordinator/test_api.py tests/coordinator/test_batch_routes.py
	$(MAKE) fuzz-ci

# The page tests drive Debian's chromium headless through Playwright (never a browser Playwright
# downloads); installed here when missing. Without it they fail under CI=true and skip elsewhere.
browser:
	@command -v chromium >/dev/null 2>&1 || { apt-get update -qq && \
		DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; } || \
		echo "chromium is not installed and could not be: the page tests will not run" >&2

# The package without its worker extra, in a fresh venv with no torch: `import tetherfed`, the SDK
# and the commands that need no model (tests/notorch, skipped where torch is installed).
NOTORCH ?= .venv-notorch
notorch:
	rm -rf $(NOTORCH)
	python3 -m venv $(NOTORCH)
	$(NOTORCH)/bin/python -m pip install -q --upgrade pip
	$(NOTORCH)/bin/python -m pip install -q '.[report]' 'pytest>=8' 'pytest-timeout>=2.3'
	! $(NOTORCH)/bin/python -c "import torch" 2>/dev/null
	$(NOTORCH)/bin/python -m pytest -q -p no:cacheprovider tests/notorch

# The documentation site: reference pages generated from the code (docs/gen_ref.py); --strict
# turns a broken link or a missing reference into a failure.
DOCS_ENV := NO_MKDOCS_2_WARNING=1 DISABLE_MKDOCS_2_WARNING=true
docs-build: venv
	$(DOCS_ENV) $(PY) -m mkdocs build --strict --quiet -d site

docs: venv
	$(DOCS_ENV) $(PY) -m mkdocs serve -a 127.0.0.1:8000

test: lint docs-build unit notorch

demo: venv
	$(PY) -m tetherfed.cli up --workers 3 --task digits --steps 300 --eval-every 50 --log-every 25 \
		--diagnostics every=epoch --out runs/demo

bench: venv
	$(PY) -m tetherfed.cli bench --json bench-results.jsonl

bench-quick: venv
	$(PY) -m tetherfed.cli bench --quick --json bench-quick.jsonl

# Peers the `round` row runs in the same run (Flower, docs/results/benchmarks.md): installed into
# a venv of their own so their dependencies never change .venv's; the stamp makes it idempotent.
PEERS ?= .venv-peers
FLWR ?= flwr==1.42.0
PEERS_STAMP := $(PEERS)/.installed-$(subst ==,-,$(FLWR))

bench-peers: $(PEERS_STAMP)

$(PEERS_STAMP):
	test -x $(PEERS)/bin/python || python3 -m venv $(PEERS)
	$(PEERS)/bin/python -m pip install -q --upgrade pip
	$(PEERS)/bin/python -m pip install -q '$(FLWR)'
	rm -f $(PEERS)/.installed-*
	touch $@

clean:
	rm -rf $(VENV) $(NOTORCH) $(PEERS) site .pytest_cache .mypy_cache .ruff_cache .hypothesis .schemathesis runs

# Fuzzing: hypothesis on the frame decoders (CI runs 100 examples per test inside
# `make test`), then schemathesis against a real coordinator's /openapi.json with the stateful
# phase. FUZZ_EXAMPLES is per operation.
fuzz: venv
	FUZZ_FRAME_EXAMPLES=$${FUZZ_FRAME_EXAMPLES:-3000} $(PY) -m pytest -q -p no:cacheprovider tests/protocol/test_frame_fuzz.py
	FUZZ_EXAMPLES=$${FUZZ_EXAMPLES:-60} $(PY) tests/fuzz/run_api_fuzz.py

# CI's share of the API fuzzer (inside `make test`): 5 examples per operation, every phase, the
# whole schemathesis run bounded to 40 s; fails on any server error or schema violation.
fuzz-ci: venv
	FUZZ_EXAMPLES=5 FUZZ_MAX_TIME=40 $(PY) tests/fuzz/run_api_fuzz.py

# Chaos: kill -9 workers, the coordinator, its scoring process and Redis at random
# moments of a real ensemble, CHAOS_KILLS times each, then check that no acked decision was lost
# and none applied twice (tests/chaos/run_chaos.py; `make test` runs 2 kills each).
chaos: venv
	CHAOS_KILLS=$${CHAOS_KILLS:-20} $(PY) tests/chaos/run_chaos.py
