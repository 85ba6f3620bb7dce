# Two commands on a fresh machine: `make demo` and `make test`.
# Both create .venv, install torch (pinned: the CPU build that lies on local
# disk here; elsewhere any torch >= 2.3 works with `pip install -e .`), the
# package with the extras the tests, the demo and the benchmarks use (test, hf,
# bench), build the native sparse kernels (C++ with g++ and ninja; without a
# compiler the kernels fall back to PyTorch with one warning), and make sure
# Fashion-MNIST is present.

PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
TORCH_SPEC ?= torch==2.13.0
DATA_DIR := /usr/share/datasets/fashion-mnist

.PHONY: demo test setup data fortunes bench clean

demo: setup data
	$(PY) -m sparseforge demo

test: setup data
	$(PY) -m pytest

setup: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check "$(TORCH_SPEC)"
	$(PY) -m pip install --quiet --disable-pip-version-check -e '.[test,hf,bench]'
	$(PY) -m sparseforge.kernels.build
	touch $(STAMP)

# Fashion-MNIST (Debian's dataset-fashion-mnist) and English text (Debian's
# fortunes), installed with apt-get when we are root; otherwise say how to get
# them (the tests that need them then skip).
data: fortunes
	@if [ -n "$$SPARSEFORGE_DATA" ] || [ -f $(DATA_DIR)/train-images-idx3-ubyte.gz ]; then \
		true; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
		echo "installing Fashion-MNIST (Debian package dataset-fashion-mnist)"; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq dataset-fashion-mnist >/dev/null; \
	else \
		echo "warning: Fashion-MNIST not found in $(DATA_DIR). Install it with"; \
		echo "  sudo apt-get install dataset-fashion-mnist"; \
		echo "or download the four .gz files of github.com/zalandoresearch/fashion-mnist into a folder"; \
		echo "and set SPARSEFORGE_DATA=that/folder."; \
	fi

FORTUNES_DIR := /usr/share/games/fortunes

fortunes:
	@if [ -n "$$SPARSEFORGE_FORTUNES" ] || [ -f $(FORTUNES_DIR)/science ]; then \
		true; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
		echo "installing English text (Debian package fortunes)"; \
		(apt-get install -y -qq fortunes >/dev/null 2>&1 || \
		 (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq fortunes >/dev/null)); \
	else \
		echo "warning: fortune files not found in $(FORTUNES_DIR): sudo apt-get install fortunes"; \
	fi

bench: setup data
	$(PY) -m sparseforge.bench overhead

clean:
	rm -rf $(VENV) build src/*.egg-info .pytest_cache .hypothesis
