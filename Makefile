# Two commands do all the set-up on a fresh machine: `make demo` and `make test`.
# CPU installs use constraints/cpu.txt (torch 2.13.0 CPU + torchvision 0.28.0, see README "Installing").
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.didbq-installed
export HF_HUB_OFFLINE := 1
export HF_DATASETS_OFFLINE := 1

.PHONY: install demo test clean

$(STAMP): pyproject.toml constraints/cpu.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --disable-pip-version-check -c constraints/cpu.txt -e ".[test]"
	touch $(STAMP)

install: $(STAMP)

demo: install
	$(BIN)/didbq recipes
	$(BIN)/didbq plan deit_tiny_patch16_224 --recipe recipes/didb.yaml
	$(BIN)/didbq plan swin_tiny_patch4_window7_224 --recipe recipes/xnor.yaml --json | $(BIN)/python -c \
	  "import json,sys; t=json.load(sys.stdin)['totals']; print('swin_tiny xnor: BOPs {bops:,} FLOPs {flops:,} OPs {ops:,.0f} packed {packed_bytes:,} B'.format(**t))"

test: install
	$(BIN)/python -m pytest

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .hypothesis
