# tetherfed: `make demo` runs a local ensemble, `make test` runs every check. Both bootstrap .venv.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-$(shell cksum pyproject.toml | cut -d' ' -f1)
TORCH_CPU ?= torch==2.13.0

.PHONY: venv test lint unit demo bench bench-quick clean

venv: $(STAMP)

# --system-site-packages lets a GPU user's own torch build (installed first) be used as is;
# only when no torch is importable do we install the CPU build.
$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv --system-site-packages $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q $(TORCH_CPU)
	$(PY) -m pip install -q -e '.[worker,test]'
	rm -f $(VENV)/.installed-*
	touch $@

lint: venv
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy tether_protocol

unit: venv
	$(VENV)/bin/pytest -q

test: lint unit

demo: venv
	$(VENV)/bin/tetherfed up --workers 3 --task random-classification --steps 600 --out runs/demo

bench: venv
	$(VENV)/bin/tetherfed bench --json bench-results.jsonl

bench-quick: venv
	$(VENV)/bin/tetherfed bench --quick --json bench-quick.jsonl

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache .hypothesis runs
