# recon-server: `make demo` runs the main job, `make test` runs the checks.
# Both install what they need: a virtual environment, and Debian packages when run as root.

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# The CPU wheel of this version ships on the build machines; a bare `torch` would pull CUDA builds.
TORCH_SPEC ?= torch==2.13.0
DEB_PACKAGES := orthanc dicom3tools dcmtk ismrmrd-tools bart mricron-data docker-compose
DEMO_OUT ?= demo-out

.PHONY: all venv deps test lint typecheck unit demo bench clean

all: test

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q "$(TORCH_SPEC)"
	$(BIN)/pip install -q -e ".[dev]"
	touch $@

venv: $(VENV)/.installed

# Debian packages the tests and demo rely on (real PACS, DICOM validator, ISMRMRD tools, BART).
deps:
	@missing=""; for p in $(DEB_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then \
	  if [ "$$(id -u)" = 0 ]; then \
	    echo "installing Debian packages:$$missing"; \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing >/dev/null; \
	  else \
	    echo "missing Debian packages:$$missing (run as root, or: sudo apt-get install$$missing)"; exit 1; \
	  fi; \
	fi

lint: venv
	$(BIN)/ruff check recon_server tests benchmarks
	$(BIN)/ruff format --check recon_server tests benchmarks

typecheck: venv
	$(BIN)/mypy

unit: venv deps
	$(BIN)/pytest -q

test: venv deps lint typecheck unit

demo: venv deps
	$(BIN)/recon-server demo --out $(DEMO_OUT)

# The benchmarks that need no trained model; each prints a table with its command and machine.
bench: venv deps
	for b in bench_recon bench_ingest bench_simulate; do $(BIN)/python benchmarks/$$b.py || exit 1; done

clean:
	rm -rf $(VENV) $(DEMO_OUT) .pytest_cache .mypy_cache .ruff_cache
