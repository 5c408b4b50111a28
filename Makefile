# Two commands on a fresh machine: `make run` and `make test`.
# Everything is installed into a project virtual environment (.venv) on first use.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
export PATH := $(CURDIR)/$(BIN):$(PATH)

.PHONY: install run luigi test bench ablation clean

install: $(STAMP)

$(STAMP): requirements.txt pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -r requirements.txt 2>&1 | grep -v "^WARNING: Location" || true
	$(BIN)/python -m pip install --quiet --disable-pip-version-check --no-deps --no-build-isolation -e . 2>&1 | grep -v "^WARNING: Location" || true
	cd / && $(CURDIR)/$(BIN)/python -c "import torch, torchvision, cv2, h5py, dvc, luigi, stages, pipeline; cv2.ximgproc.segmentation"
	touch $@

run: $(STAMP)
	dvc repro
	dvc metrics show

luigi: $(STAMP)
	luigi --module pipeline RunAll --local-scheduler

test: $(STAMP)
	$(BIN)/python -m pytest -q tests

bench: $(STAMP)
	$(BIN)/python -m bench

clean:
	rm -rf features_cache/* .luigi

ablation: $(STAMP)
	$(BIN)/python -m bench.ablation
