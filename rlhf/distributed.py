"""More than one process: everything a stage needs to run under `torchrun` the way it runs alone.

A stage calls `start(device)` once (a process group when torchrun started several processes, nothing otherwise),
shards its model with `shard_model`, takes its part of each global batch with `shard`, turns its loss into its
share of the global loss with `share_of_global_mean`, synchronises and clips gradients with `clip_gradients`, reduces
its metrics with `weighted_mean`, and saves on rank 0 only (`full_state_dict` gathers the weights first).

The meaning of a step does not depend on the number of processes: `batch_size` is the global batch, each rank takes
a slice of it (every rank draws the same global batch: the data order comes from the same seed), and each loss is a
mean over the global batch (tokens for SFT, pairs for reward and DPO), never a mean of the ranks' means. Each rank
backpropagates its share, `local mean × local count / global count`, and the gradients are summed over the ranks,
so they are the gradients of one process that saw the whole batch.

Sharding (`fsdp: auto`, on with more than one process): FSDP2 (`torch.distributed.fsdp.fully_shard`) over each
decoder layer, then the rest of the model; each rank keeps 1/N of every parameter, gradient and optimiser moment,
and a layer's full weights exist only while it computes. On CUDA with bf16 the layers compute with bf16 weights
and reduce gradients in fp32 (`MixedPrecisionPolicy`); on CPU the weights stay fp32 under bf16 autocast, as in one
process. `fsdp: false` with several processes keeps a full copy of the model on every rank and sums the gradients
after the backward pass.

With one process (`WORLD_SIZE` unset or 1) nothing here makes a process group or changes a number: every function
returns its input or the local value.
"""

from __future__ import annotations

import contextlib
import datetime
import os
import sys
from typing import Iterator, Literal, TypeVar, Union

import torch

T = TypeVar("T")

# `fsdp` in sft, reward and dpo: True, False, or "auto" (sharded when there is more than one process)
Sharding = Union[bool, Literal["auto"]]

# A collective that waits longer than this (a rank that died or hangs) fails instead of waiting forever
TIMEOUT_SECONDS = int(os.environ.get("RLHF_COLLECTIVE_TIMEOUT", "600"))


class SettingError(ValueError):
    """A setting that cannot work with these processes; every process meets it the same way (rank 0 reports it)."""


# --- processes ------------------------------------------------------------------------------------------------
def world_size() -> int:
    """The number of processes torchrun started (1 when run plainly)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def rank() -> int:
    """This process's rank among all of them (0 when run plainly): only rank 0 prints, logs and saves."""
    return int(os.environ.get("RANK", "0"))


def local_rank() -> int:
    """This process's rank on its own machine: which GPU it takes."""
    return int(os.environ.get("LOCAL_RANK", "0"))


def is_main() -> bool:
    return rank() == 0


def is_distributed() -> bool:
    """More than one process, with the process group up."""
    return world_size() > 1 and torch.distributed.is_available() and torch.distributed.is_initialized()


def start(device: torch.device) -> torch.device:
    """Under torchrun with more than one process: join the process group (NCCL on CUDA, gloo on CPU; collectives
    time out after `TIMEOUT_SECONDS`) and → this process's device (`cuda:LOCAL_RANK` on CUDA). With one process:
    nothing, → `device`. Joining twice (two stages in one process) is a no-op."""
    if world_size() <= 1:
        return device
    if device.type == "cuda":
        device = torch.device("cuda", local_rank())
        torch.cuda.set_device(device)
    if not torch.distributed.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        kwargs = {"device_id": device} if device.type == "cuda" else {}
        torch.distributed.init_process_group(backend, timeout=datetime.timedelta(seconds=TIMEOUT_SECONDS), **kwargs)
    return device


_left_a_group = False


def stop() -> None:
    """Leave the process group (at the end of a command); nothing with one process."""
    global _left_a_group
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
        _left_a_group = True


def exit_now_if_left(code: int) -> int:
    """A process that left a process group ends here with `code`, skipping the interpreter's teardown: gloo's
    threads can still abort it there (`terminate called without an active exception`, exit -6 instead of `code`),
    after the command finished and printed everything, which torchrun then reports as a failed run. Everything
    this project writes is closed by then; the streams are flushed first. → `code` in a process that never
    joined a group."""
    if _left_a_group:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    return code


def barrier() -> None:
    """Every rank waits here for the others (rank 0 writing a checkpoint the others then read)."""
    if is_distributed():
        torch.distributed.barrier()


# --- the global batch -----------------------------------------------------------------------------------------
def shard(batch: list[T], index: int | None = None, ranks: int | None = None) -> list[T]:
    """Rank `index`'s part (default: this process's) of a global batch split over `ranks` (default: the processes):
    contiguous slices whose sizes differ by at most one, so that every rank computes on at least one item (an FSDP
    forward pass is a collective every rank joins)."""
    ranks = ranks or (world_size() if is_distributed() else 1)
    index = rank() if index is None else index
    if ranks == 1:
        return batch
    if len(batch) < ranks:
        raise SettingError(f"batch_size: a batch of {len(batch)} cannot be split over {ranks} processes; use a "
                           f"batch_size of at least {ranks}")
    rows = part_of(len(batch), index, ranks)
    return batch[rows.start:rows.stop]


def reduce_sum(value: torch.Tensor | float) -> torch.Tensor:
    """The sum over ranks of a number or tensor (float64 for counts and sums of many values); the value itself
    with one process."""
    tensor = torch.as_tensor(value).detach()
    if not is_distributed():
        return tensor
    total = tensor.to(_collective_device(), torch.float64).clone()
    torch.distributed.all_reduce(total)
    return total.to(tensor.device)


def share_of_global_mean(local_mean: torch.Tensor, local_count: torch.Tensor | int) -> torch.Tensor:
    """This rank's share of the mean over the global batch: `local_mean × local_count / global_count`, whose sum
    over the ranks is the global mean (a token mean weighted by the ranks' token counts, a pair mean by their pair
    counts). Its gradient, summed over the ranks, is the gradient of the global mean. `local_mean` unchanged with
    one process."""
    if not is_distributed():
        return local_mean
    count = torch.as_tensor(local_count, dtype=torch.float64)
    return local_mean * (count / reduce_sum(count).clamp(min=1)).to(local_mean.device, local_mean.dtype)


def weighted_mean(values: dict[str, torch.Tensor], local_count: torch.Tensor | int) -> dict[str, torch.Tensor]:
    """Each value, a mean over this rank's items, → the mean over the global batch (weighted by the ranks' counts),
    in one collective; unchanged with one process."""
    if not is_distributed() or not values:
        return values
    count = float(local_count)
    stacked = torch.stack([torch.as_tensor(v).detach().to("cpu", torch.float64) for v in values.values()])
    total = reduce_sum(torch.cat([stacked * count, torch.tensor([count], dtype=torch.float64)]))
    means = total[:-1] / total[-1].clamp(min=1)
    return {k: means[i].float() for i, k in enumerate(values)}


def all_agree(flag: bool) -> bool:
    """True when `flag` is true on every rank (one rank's non-finite loss makes every rank skip the step, so the
    ranks' weights never diverge); the flag itself with one process."""
    if not is_distributed():
        return flag
    return bool(reduce_sum(0.0 if flag else 1.0).item() == 0)


def gather_objects(value: T) -> list[T]:
    """Every rank's `value` (picklable: a rollout's CPU tensors, a list of floats), in rank order, on every rank;
    `[value]` with one process."""
    if not is_distributed():
        return [value]
    values: list = [None] * world_size()
    torch.distributed.all_gather_object(values, value)
    return values


def from_rank0(tensor: torch.Tensor) -> torch.Tensor:
    """Rank 0's tensor on every rank (a random draw that must be the same everywhere, such as the order of PPO's
    mini-batches); the tensor itself with one process."""
    if not is_distributed():
        return tensor
    shared = tensor.to(_collective_device()).contiguous()
    torch.distributed.broadcast(shared, src=0)
    return shared.to(tensor.device)


def part_of(count: int, index: int | None = None, ranks: int | None = None) -> range:
    """Rank `index`'s rows (default: this process's) of `count` rows split over `ranks` (default: the processes), as
    `shard` splits a batch, except that a rank may get none: for work without collectives (sampling with the
    weights gathered, scoring), where a round of fewer prompts than processes leaves some idle."""
    ranks = ranks or (world_size() if is_distributed() else 1)
    index = rank() if index is None else index
    base, extra = divmod(count, ranks)
    begin = index * base + min(index, extra)
    return range(begin, begin + base + (index < extra))


def my_part(items: list[T]) -> list[T]:
    """This process's part of a list (`part_of`; all of it in one process)."""
    rows = part_of(len(items))
    return items[rows.start:rows.stop]


def _collective_device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if torch.distributed.get_backend() == "nccl" \
        else torch.device("cpu")


# --- sharding the model ---------------------------------------------------------------------------------------
def use_fsdp(setting: Sharding) -> bool:
    """`fsdp: auto` → sharded when there is more than one process; true with one process shards over one rank (it
    runs, and the step's numbers are those of the plain model)."""
    return world_size() > 1 if setting == "auto" else bool(setting)


def is_sharded(model: torch.nn.Module) -> bool:
    """Whether FSDP holds this model's parameters as shards (DTensors)."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return False
    from torch.distributed.tensor import DTensor

    return any(isinstance(p, DTensor) for p in model.parameters())


def parallel(model: torch.nn.Module, config, bf16: bool, device: torch.device,
             units: list[torch.nn.Module] | None = None) -> torch.nn.Module:
    """A stage's model made ready for its processes, by its config's `fsdp` and `activation_checkpointing`: layers
    recomputed in the backward pass if asked, then sharded with FSDP2 (`shard_model`) if `fsdp` says so (`auto`:
    with more than one process). Without sharding, several processes each keep a full copy (`clip_gradients` sums
    their gradients). What is not supported under FSDP yet is refused by name: `compile`. With LoRA the frozen base
weights are sharded with the adapter beside them (FSDP2 shards frozen and trained parameters of one unit alike),
and only the adapter is trained."""
    if config.activation_checkpointing:
        checkpoint_activations(model)
    if not use_fsdp(config.fsdp):
        return model
    if getattr(config, "compile", False):
        raise SettingError("fsdp: compile: true is not supported with FSDP yet; use compile: false or fsdp: "
                           "false")
    return shard_model(model, bf16, device, units)


def decoder_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The model's decoder layers (transformers marks them as `GradientCheckpointingLayer`)."""
    from transformers.modeling_layers import GradientCheckpointingLayer

    return [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer)]


def checkpoint_activations(model: torch.nn.Module) -> int:
    """Keep only each decoder layer's input for the backward pass and recompute the layer there: activation memory
    of one layer instead of all of them, for about one more forward pass. (transformers' own switch acts only in
    train mode, and our models stay in eval mode to keep dropout off.) → the number of layers."""
    from torch.utils.checkpoint import checkpoint

    layers = decoder_layers(model)
    for layer in layers:
        forward = layer.forward

        def recomputed(*args, _forward=forward, **kwargs):
            if not torch.is_grad_enabled():
                return _forward(*args, **kwargs)
            return checkpoint(_forward, *args, use_reentrant=False, **kwargs)

        layer.forward = recomputed
    return len(layers)


def shard_model(model: torch.nn.Module, bf16: bool, device: torch.device,
                units: list[torch.nn.Module] | None = None) -> torch.nn.Module:
    """FSDP2 over the model, in place: each decoder layer is one unit, then `units` (default: the model itself)
    take the parameters left (embeddings, final norm, heads; tied embeddings must stay in one unit). A reward
    model's backbone and score head are called one by one (`pair_scores`), so there they are two units and the
    model itself is not one. Gradients are summed over the ranks (each rank's loss is its share of the global
    loss), not averaged. → the model (its class is now also an `FSDPModule` where it is a unit)."""
    from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard

    if not torch.distributed.is_initialized():  # `fsdp: true` in one process: a group of one
        backend = "nccl" if device.type == "cuda" else "gloo"
        torch.distributed.init_process_group(backend, rank=0, world_size=1, store=torch.distributed.HashStore(),
                                             timeout=datetime.timedelta(seconds=TIMEOUT_SECONDS))
    # bf16 weights in the layers' matmuls and fp32 gradient reduction on CUDA; on CPU fp32 weights under autocast
    policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) \
        if bf16 and device.type == "cuda" else MixedPrecisionPolicy()
    layers = decoder_layers(model)
    if not layers:
        raise SettingError(f"fsdp: found no decoder layers in {type(model).__name__} to shard; use fsdp: false")
    for layer in layers:
        fully_shard(layer, mp_policy=policy)
    for unit in units or [model]:
        fully_shard(unit, mp_policy=policy)
    for module in model.modules():
        if isinstance(module, FSDPModule):  # a plain sum: gloo has no pre-multiplied or averaging reduction
            module.set_gradient_divide_factor(1.0)
            module.set_force_sum_reduction_for_comms(True)
    return model


def clip_gradients(model: torch.nn.Module | list[torch.nn.Module], max_norm: float,
                   replicated: list[torch.nn.Parameter] | None = None) -> torch.Tensor:
    """Make the gradients those of the global batch, then clip them to `max_norm` together → the global norm before
    clipping. `model` is one model or several trained at once (PPO's policy and critic). FSDP has summed each
    shard's gradient over the ranks already; a replicated model's gradients are summed here, and so are those of
    `replicated` (parameters outside the models that every rank holds whole, such as PPO's value head); with one
    process and no sharding this is `clip_grad_norm_`."""
    sharded, plain = [], [p for p in replicated or [] if p.grad is not None]
    for one in model if isinstance(model, (list, tuple)) else [model]:
        (sharded if is_sharded(one) else plain).extend(p for p in one.parameters() if p.grad is not None)
    if is_distributed():
        for p in plain:
            torch.distributed.all_reduce(p.grad)
    if not sharded:
        return torch.nn.utils.clip_grad_norm_(plain, max_norm)
    from torch.distributed.tensor import DTensor

    norm = torch.nn.utils.get_total_norm([p.grad for p in sharded])
    if isinstance(norm, DTensor):  # each rank's shards → the norm over all of them
        norm = norm.full_tensor()
    if plain:
        norm = torch.nn.utils.get_total_norm([norm, torch.nn.utils.get_total_norm([p.grad for p in plain])])
    torch.nn.utils.clip_grads_with_norm_(sharded, max_norm, norm)
    if plain:  # apart: one clipping call cannot mix sharded (DTensor) and plain gradients
        torch.nn.utils.clip_grads_with_norm_(plain, max_norm, norm)
    return norm


@contextlib.contextmanager
def gathered(*models: torch.nn.Module | None) -> Iterator[None]:
    """The sharded models' whole weights on every rank for the block, gathered once (one all-gather per FSDP unit)
    and kept through any number of forward passes, then sharded again. For sampling: without it every new token
    would gather every layer again, and ranks whose answers end at different lengths would wait on each other's
    collectives. Inside, no forward pass runs a collective, so ranks may run different numbers of them. Every rank
    must enter and leave together; models that are not sharded (or None) are left alone. Needs the whole model to
    fit one device beside its shards."""
    from torch.distributed.fsdp import FSDPModule

    units = [m for model in models if model is not None and is_sharded(model)
             for m in model.modules() if isinstance(m, FSDPModule)]
    # FSDP settles each root's own choices at its first forward pass; settle them now, or a first forward inside the
    # block (on some processes only) would leave them different on each process once the block restores them
    inner = {id(m) for unit in units for m in unit.modules() if m is not unit}
    for root in (unit for unit in units if id(unit) not in inner):
        root._get_fsdp_state()._lazy_init()
    # no resharding after a forward pass inside the block (a unit without a post-forward mesh keeps its weights, as
    # the root does for the backward that follows its forward), each unit's own choice restored after
    groups = [group for unit in units for group in _param_groups(unit._get_fsdp_state())]
    meshes = [group.post_forward_mesh_info for group in groups]
    for group in groups:
        group.post_forward_mesh_info = None
    try:
        for unit in units:
            unit.unshard()
        yield
    finally:
        for group, mesh in zip(groups, meshes):
            group.post_forward_mesh_info = mesh
        for unit in units:
            unit.reshard()


def _param_groups(state) -> list:
    """An FSDP unit's parameter groups: a list in torch 2.13 (`_fsdp_param_groups`), one group or None in torch 2.11
    (`_fsdp_param_group`), which CUDA machines may still have."""
    if hasattr(state, "_fsdp_param_groups"):
        return list(state._fsdp_param_groups)
    return [state._fsdp_param_group] if state._fsdp_param_group is not None else []


def full_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The whole model's weights gathered on the CPU of rank 0 (other ranks get {}); every rank must call it. A
    model that is not sharded → its own state dict."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    if not is_sharded(model):
        return model.state_dict() if is_main() else {}
    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def local_sizes(model: torch.nn.Module, optimizer: torch.optim.Optimizer | None = None) -> dict[str, int]:
    """Elements this rank holds: its parameter shards, and its optimiser state (the moments; step counters
    excluded), against the model's full parameter count."""
    from torch.distributed.tensor import DTensor

    def local(t: torch.Tensor) -> int:
        return t.to_local().numel() if isinstance(t, DTensor) else t.numel()

    sizes = {"parameters": sum(local(p) for p in model.parameters()), "full_parameters": sum(p.numel() for p in
                                                                                              model.parameters())}
    if optimizer is not None:
        sizes["optimizer"] = sum(local(v) for state in optimizer.state.values() for k, v in state.items()
                                 if isinstance(v, torch.Tensor) and k != "step")
    return sizes
