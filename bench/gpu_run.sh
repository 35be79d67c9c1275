#!/usr/bin/env bash
# Every GPU measurement bench/README.md plans ("More than one process", "PPO against TRL 1.12") in one run, on a
# machine with one NVIDIA GPU, PyTorch with CUDA (Python 3.12) and no network. Results go to $OUT (default
# /tmp/gpu-out).   bash bench/gpu_run.sh
# It needs, beside the repository (git-ignored, prepared where pip works):
#   .gpu/whl    wheels such an image lacks: pip download --no-deps --only-binary=:all: --python-version 3.12
#               --implementation cp --platform manylinux2014_x86_64 --platform any -d .gpu/whl transformers==5.25.0
#               trl==1.12.0 datasets dill multiprocess huggingface_hub==2.4.0 kernels==0.19.1 httpx2 httpcore2
#               truststore idna click hf-xet h11 pyphen==0.18.1
#   .gpu/cache/smollm2-135m-instruct   config.json, generation_config.json, tokenizer*.json and chat_template.jinja
#               of the converted embedded model (~/.cache/rlhf/...): the Qwen2-shaped model borrows its tokenizer
OUT=${OUT:-/tmp/gpu-out}
mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .gpu/whl/*.whl \
    || exit 1
export PYTHONPATH=/tmp/site:$PWD RLHF_CACHE=$PWD/.gpu/cache PYTHONUNBUFFERED=1
# transformers 5.25 (which requires `kernels`) loads hub kernels by default; with no network they
# cannot load, and both sides of each comparison should run the same plain modelling code
export USE_HUB_KERNELS=0
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv
python3 -c "import torch, transformers, trl; print('torch', torch.__version__, 'transformers', transformers.__version__,
'trl', trl.__version__)"
# 1. the tiny pipeline end to end on CUDA in bf16, its RL stage as GRPO (prompts read once per group), and DPO
timeout 100 python3 bench/gpu_smoke.py --device cuda > "$OUT/smoke.log" 2>&1; tail -25 "$OUT/smoke.log"
# 2. SFT and PPO at 1 rank (NCCL), Qwen2-0.5B's shape in bf16, FSDP2 on and off (H200: 989 TFLOP/s dense bf16)
timeout 220 python3 bench/distributed_scaling.py --device cuda --model qwen2-0.5b --processes 1 --fsdp true,false \
    --steps 5 --peak_tflops 989 --json "$OUT/distributed_scaling_gpu.json" > "$OUT/scaling.log" 2>&1
grep -v Warning "$OUT/scaling.log" | tail -40
# 3. PPO against TRL 1.12 on the same GPU, same model shape (H200: 4.8 TB/s)
timeout 230 python3 bench/ppo_vs_trl.py --device cuda --model qwen2-0.5b --settings bf16 --generation --skip-memory \
    --bandwidth_gbs 4800 --peak_tflops 989 --steps 5 --json "$OUT/ppo_vs_trl_gpu.json" > "$OUT/ppo_vs_trl.log" 2>&1
grep -v Warning "$OUT/ppo_vs_trl.log" | tail -40
