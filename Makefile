# Two commands do all the set-up on a fresh machine: `make demo` and `make test`.
# CPU installs use constraints/cpu.txt (torch 2.13.0 CPU + torchvision 0.28.0, see README "Installing").
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.didbq-installed
export HF_HUB_OFFLINE := 1
export HF_DATASETS_OFFLINE := 1

FASHION_MNIST := /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz

.PHONY: install data demo plan-demo test clean

$(STAMP): pyproject.toml constraints/cpu.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --disable-pip-version-check -c constraints/cpu.txt -e ".[test]"
	touch $(STAMP)

install: $(STAMP)

# Fashion-MNIST, offline, from Debian's package (needs root or sudo once).
$(FASHION_MNIST):
	$(if $(filter 0,$(shell id -u)),,sudo) apt-get update -qq
	$(if $(filter 0,$(shell id -u)),,sudo) apt-get install -y -qq dataset-fashion-mnist

data: $(FASHION_MNIST)

# The offline quickstart: a small ViT teacher trained on Fashion-MNIST, then the DIDB student distilled fully
# binary, evaluated (on the packed runtime), written to runs/quick, and timed against fp32 (a few minutes on
# 2 cores).
demo: install data
	$(BIN)/didbq plan vit_tiny_patch16_224 --recipe recipes/quick.yaml -m num_classes=10
	$(BIN)/didbq binarize vit_tiny_patch16_224 --recipe recipes/quick.yaml --data fashion-mnist --out runs/quick --force
	$(BIN)/didbq eval runs/quick
	$(BIN)/didbq report runs/quick --plot runs/quick/report.png
	$(BIN)/didbq bench runs/quick --batch 1 --batch 32 --threads 1

plan-demo: install
	$(BIN)/didbq plan deit_small_patch16_224 --recipe recipes/didb.yaml

test: install data
	$(BIN)/python -m pytest

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .hypothesis
