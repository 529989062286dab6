# Two entry points for a fresh machine (README): `make demo` and `make test`.
# Each creates .venv if needed and installs what it needs; torch is installed first and pinned,
# so the later installs never pull a second torch.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: demo test test-engines gguf-demo install lint bench-cpu clean

$(STAMP): requirements.txt requirements-dev.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -r requirements-dev.txt
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(PY) -m hai_medqa.demo --workdir outputs/demo

# Experiment trackers for tests/train/test_trackers.py (issue 20; ~40 s, ~180 MB): wandb and mlflow-skinny
# into the venv (exact pins; nothing installed changes), trackio with --no-deps into its own folder (it pins
# pillow<13; the venv has 13), which only that test's subprocess puts on PYTHONPATH.
TRACKERS := $(VENV)/.trackers
TRACKIO  := $(VENV)/trackio

$(TRACKERS): $(STAMP) requirements-trackers.txt requirements-trackio.txt
	$(PY) -m pip install -q -r requirements-trackers.txt
	rm -rf $(TRACKIO)
	$(PY) -m pip install -q --no-deps --target $(TRACKIO) -r requirements-trackio.txt
	touch $@

# HAI_TEST_FLEX_CPU=1: also prove packing exact under flex attention on the CPU (~1 min of compiling).
# With CI=true a tracker missing from the tracker test fails it instead of skipping it.
test: $(STAMP) $(TRACKERS)
	HAI_TEST_FLEX_CPU=1 HAI_TRACKIO_PATH=$(abspath $(TRACKIO)) $(PY) -m pytest -q --durations=20

# Cross-engine checks (issue 16): llama.cpp (built once from its sdist, ~10 min on 2 cores, then cached
# outside the clone), transformers 4.57.6 in its own folder, mistral.rs and Go read what the project publishes.
test-engines: $(STAMP)
	PY=$(PY) bash .ci/engines.sh
	HAI_ENGINE_TESTS=1 $(PY) -m pytest -q tests/engines

# GGUF (f16, q8_0) + Ollama Modelfile of the demo's merged tiny model, after `make demo`.
gguf-demo: $(STAMP)
	$(PY) -m hai_medqa.publish.gguf_release outputs/demo/merged --repo-id your-hf-id/EXAONE-3.5-MedQA-demo --types f16,q8_0

lint: $(STAMP)
	$(VENV)/bin/ruff check .

clean:
	rm -rf outputs .pytest_cache
