#!/usr/bin/env bash
# The GPU figures of bench/README.md ("On one GPU") in one run, on a machine with one NVIDIA GPU, PyTorch with CUDA
# and no network. Carried beside the repository: .gpu/whl (wheels: transformers 5.25, trl 1.12.0, datasets and what
# they need that such an image lacks) and .gpu/cache/smollm2-135m-instruct (the embedded model's tokenizer and
# config: the Qwen2-shaped model borrows its vocabulary). Results go to $OUT (default /tmp/gpu-out).
#   bash bench/gpu_run.sh
OUT=${OUT:-/tmp/gpu-out}
mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .gpu/whl/*.whl \
    || exit 1
export PYTHONPATH=/tmp/site:$PWD RLHF_CACHE=$PWD/.gpu/cache PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv
python3 -c "import torch, transformers, trl; print('torch', torch.__version__, 'transformers', transformers.__version__,
'trl', trl.__version__)"
# 1. the tiny pipeline end to end on CUDA in bf16
timeout 100 python3 bench/gpu_smoke.py --device cuda 2>&1 | tail -25
# 2. SFT and PPO at 1 rank (NCCL), Qwen2-0.5B's shape in bf16, FSDP2 on and off (H200: 989 TFLOP/s dense bf16)
timeout 220 python3 bench/distributed_scaling.py --device cuda --model qwen2-0.5b --processes 1 --fsdp true,false \
    --steps 5 --peak_tflops 989 --json "$OUT/distributed_scaling_gpu.json" 2>&1 | grep -v Warning | tail -40
# 3. PPO against TRL 1.12 on the same GPU, same model shape (H200: 4.8 TB/s)
timeout 230 python3 bench/ppo_vs_trl.py --device cuda --model qwen2-0.5b --settings bf16 --generation --skip-memory \
    --bandwidth_gbs 4800 --peak_tflops 989 --steps 5 --json "$OUT/ppo_vs_trl_gpu.json" 2>&1 | grep -v Warning | tail -40
