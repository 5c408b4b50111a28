# Two commands on a fresh machine: `make run` and `make test`.
# Everything is installed into a project virtual environment (.venv) on first use.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
export PATH := $(CURDIR)/$(BIN):$(PATH)

.PHONY: install run luigi verify test test-quick bench ablation velocities clean dvc.yaml

install: $(STAMP)

$(STAMP): requirements.txt pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -r requirements.txt 2>&1 | grep -v "^WARNING: Location" || true
	$(BIN)/python -m pip install --quiet --disable-pip-version-check --no-deps --no-build-isolation -e . 2>&1 | grep -v "^WARNING: Location" || true
	cd / && $(CURDIR)/$(BIN)/python -c "import torch, torchvision, cv2, h5py, dvc, luigi, stages, pipeline; cv2.ximgproc.segmentation"
	touch $@

run: $(STAMP) dvc.yaml
	dvc repro
	$(BIN)/python -m pipeline prune-lock
	dvc metrics show

luigi: $(STAMP)
	luigi --module pipeline RunAll --local-scheduler

test: $(STAMP)
	$(BIN)/python -m pytest -q tests

# The tests not marked slow (pytest.ini): under 2 minutes on 2 cores.
test-quick: $(STAMP)
	$(BIN)/python -m pytest -q -m "not slow" tests

bench: $(STAMP)
	$(BIN)/python -m bench

# dvc.yaml is generated from the stage table (stages/table.py) and params.yaml's detect.recipes
dvc.yaml: $(STAMP)
	$(BIN)/python -m pipeline dvc-yaml > $@.tmp && mv $@.tmp $@

# delete exactly the artifacts (what the table's stages write), run records and checkpoints
clean: $(STAMP)
	$(BIN)/python -m pipeline clean

# run the default pipeline in a scratch copy and compare every output with the committed dvc.lock
verify: $(STAMP)
	$(BIN)/python -m pipeline verify

# options of the runner, e.g. make ablation ABLATION_ARGS="--seeds 3" (python -m bench.ablation --help)
ABLATION_ARGS ?=
ablation: $(STAMP)
	$(BIN)/python -m bench.ablation $(ABLATION_ARGS)

# the "various velocities" table, slow to faster: R-CNN, SPP-net, Fast R-CNN (+ OHEM, + SVD), Faster R-CNN
velocities: $(STAMP)
	$(BIN)/python -m bench.ablation --velocities $(ABLATION_ARGS)
