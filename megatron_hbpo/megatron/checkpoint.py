"""Megatron dist_checkpointing (torch_dist): policy weights, and full training state for exact resume.

Two kinds of checkpoint directory, both loadable at another TP/PP size (dist_checkpointing reshards;
the padded vocabulary is TP-independent, see model.padded_vocab_size):

    save_weights / load_weights                 model weights only (conversion, evaluation, export)
    save_training_state / load_training_state   model + optimizer + LR schedule + trainer_state.json

A training-state checkpoint lives under the run's checkpoint root as `step_XXXXXXX` (see
`checkpoint_dir`) and holds:

    metadata.json, common.pt, *.distcp   dist_checkpointing: {"model", "optimizer", "scheduler"}
    trainer_state.json                   the trainer's own JSON state (step, data position, RNG seeds, ...)

Every save writes into a temporary sibling `.{name}.tmp`; rank 0 writes trainer_state.json into it
last and renames the directory once every rank has finished. A directory named `step_XXXXXXX` that
holds trainer_state.json is therefore complete, whatever moment a crash happened at; a crash leaves at
most a stale `.tmp` directory, which a later save of the same step or `prune_checkpoints` removes. All ranks must see
the same file system (rank 0 creates and renames the directories the other ranks write into).

Optimizer state: the standard optimizer's is saved per parameter, sharded like the parameter. The
distributed optimizer's is saved in Megatron's `fully_reshardable` format (tensors of each
parameter's shape, like the standard optimizer's), so that a resume may change the TP, PP and DP
sizes; the format is recorded in the checkpoint's content metadata and read back on load, as
Megatron-LM does. Its cost: saving all-gathers this rank's model-parallel shard of the fp32 master
weights and both Adam moments over DP (CPU memory: 12 bytes per parameter of the shard on every
rank; GPU: one state's buffer at a time). Megatron's cheaper `dp_reshardable` format (no gather, DP
resharding only) fails to load on megatron-core 0.16 with fp32 params: its loader writes into views of
the parameters outside no_grad.

Resume is exact: at the same layout, the steps after `load_training_state` reproduce the
uninterrupted run bitwise (tests/dist/training_state_roundtrip.py); megatron-core 0.16 needs the
workarounds in `_torch_adam_workarounds` for that with the distributed optimizer.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist

from megatron_hbpo.atomic import fsync_dir, write_text
from megatron_hbpo.megatron.state import unwrap

if TYPE_CHECKING:  # annotations only: the directory helpers need not import the training step
    from megatron_hbpo.megatron.train_step import MegatronPolicy

TRAINER_STATE = "trainer_state.json"
_STEP_DIR = re.compile(r"step_(\d{7})")
_STALE_TMP = re.compile(r"\.step_\d{7}\.(tmp|deleting)")
# The distributed optimizer's checkpoint format. `fully_reshardable` is the one of Megatron's formats
# that survives a change of TP/PP/DP size (`dp_reshardable` only survives DP changes).
_DISTOPT_SHARDING = "fully_reshardable"


class CheckpointMismatchError(ValueError):
    """A checkpoint of another model (or optimizer kind) than the one it is loaded into; one line."""


def saved_model_shapes(directory: str | Path) -> dict[str, tuple[int, ...]]:
    """Global shapes of the model tensors a dist checkpoint holds, from its metadata alone (no process
    group, no tensor read): what a check before loading compares with `convert.mapping.megatron_checkpoint_shapes`."""
    from torch.distributed.checkpoint import FileSystemReader

    from megatron_hbpo.convert.hf_io import first_line

    try:
        metadata = FileSystemReader(str(directory)).read_metadata()
    except Exception as e:  # torch raises its own types for a missing or foreign .metadata file
        raise CheckpointMismatchError(f"{directory}: not a readable Megatron dist checkpoint "
                                      f"({first_line(e)})") from None
    return {key: tuple(item.size) for key, item in metadata.state_dict_metadata.items()
            if hasattr(item, "size") and not key.startswith("optimizer.") and "_extra_state" not in key}


def check_model_shapes(directory: str | Path, expected: dict[str, tuple[int, ...]], *,
                       allow_extra: bool = False) -> None:
    """CheckpointMismatchError naming the first differences when the checkpoint's model tensors are not
    `expected` (names and global shapes): a checkpoint of another model, caught before any load.
    `allow_extra`: tensors this model lacks may be there (what `load_training_state` tolerates too)."""
    saved = saved_model_shapes(directory)
    problems = [f"{key} is {saved[key]} there, {shape} for this model" for key, shape in expected.items()
                if key in saved and saved[key] != shape]
    problems += [f"it lacks {key}" for key in expected if key not in saved]
    if not allow_extra:
        problems += [f"it has {key}, which this model lacks" for key in saved if key not in expected]
    if problems:
        more = f" (and {len(problems) - 2} more differences)" if len(problems) > 2 else ""
        raise CheckpointMismatchError(f"{directory} holds another model: {'; '.join(problems[:2])}{more}")


def save_weights(model: torch.nn.Module, directory: str | Path) -> None:
    """Collective: every rank of the job calls it. `directory` must not exist yet."""
    from megatron.core import dist_checkpointing

    directory = Path(directory)
    tmp = _tmp_dir(directory)
    if directory.exists():  # every rank checks, so that all raise together instead of hanging in a barrier
        raise FileExistsError(f"{directory} exists; refusing to overwrite a checkpoint")
    if dist.get_rank() == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    dist.barrier()
    dist_checkpointing.save(unwrap(model).sharded_state_dict(), str(tmp))
    dist.barrier()
    if dist.get_rank() == 0:
        os.rename(tmp, directory)
    dist.barrier()


def load_weights(model: torch.nn.Module, directory: str | Path) -> None:
    """Collective: load a checkpoint written at any TP/PP size into this rank's shards."""
    from megatron.core import dist_checkpointing

    directory = Path(directory)
    if not (directory / "metadata.json").is_file():
        raise FileNotFoundError(f"{directory}: not a complete Megatron dist checkpoint (no metadata.json)")
    gpt = unwrap(model)
    state = dist_checkpointing.load(gpt.sharded_state_dict(), str(directory))
    _load_model_state(gpt, state, directory)


def _load_model_state(gpt: torch.nn.Module, state: dict, directory: Path) -> None:
    result = gpt.load_state_dict(state, strict=False)
    missing = [k for k in result.missing_keys if not k.endswith("_extra_state")]
    if missing or result.unexpected_keys:
        raise CheckpointMismatchError(f"{directory}: checkpoint does not match the model: missing {missing[:5]}, "
                         f"unexpected {result.unexpected_keys[:5]}")


def _tmp_dir(directory: Path) -> Path:
    return directory.parent / f".{directory.name}.tmp"


# -- full training state ---------------------------------------------------------------------------


def _uses_distributed_optimizer(optimizer: Any) -> bool:
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    inner = getattr(optimizer, "chained_optimizers", [optimizer])
    return any(isinstance(opt, DistributedOptimizer) for opt in inner)


def _check_single_bucket(optimizer: Any) -> None:
    """megatron-core 0.16's `fully_reshardable` save slices each gathered gradient buffer at offsets
    that include the padding between buckets, which the gathered copy lacks: with several buckets
    per buffer, the optimizer state of later buckets would be saved shifted (fixed on Megatron-LM main
    by PR #5077, in no release up to core_v0.19.0). MegatronPolicy keeps overlap_grad_reduce off: one
    bucket per buffer."""
    for opt in getattr(optimizer, "chained_optimizers", [optimizer]):
        for buffer in getattr(opt, "buffers", []):
            if len(buffer.buckets) > 1:
                raise NotImplementedError(
                    f"the distributed optimizer's gradient buffer has {len(buffer.buckets)} buckets; "
                    "megatron-core 0.16 saves their optimizer state misplaced in the reshardable format. "
                    "Keep DDP overlap_grad_reduce off (one bucket per buffer) when saving training state")


def _sharding_metadata(policy: MegatronPolicy, saved: dict | None = None) -> dict:
    """The `metadata` Megatron's sharded_state_dict methods take, as Megatron-LM builds it.

    On load, the checkpoint's own content metadata decides the optimizer format (a checkpoint from
    another optimizer configuration must be read in the format it was written in).
    """
    from megatron.core import parallel_state

    if saved is not None:
        metadata = dict(saved)
    else:
        # Megatron-LM's flags for new checkpoints (a ChainedOptimizer of several optimizers then keeps
        # reshardable state keys unprefixed), so that its tools read these checkpoints the same way.
        metadata = {"singleton_local_shards": False, "chained_optim_avoid_prefix": True}
        if _uses_distributed_optimizer(policy.optimizer):
            _check_single_bucket(policy.optimizer)
            metadata["distrib_optim_sharding_type"] = _DISTOPT_SHARDING
    # A process group: passed to the state-dict builders, never serialised into the checkpoint.
    metadata["dp_cp_group"] = parallel_state.get_data_parallel_group(with_context_parallel=True)
    return metadata


@contextlib.contextmanager
def _torch_adam_workarounds(optimizer: Any) -> Iterator[None]:
    """Work around three megatron-core 0.16 bugs in loading the distributed optimizer with torch Adam.

    Without Transformer Engine or Apex (CPU, or a GPU build without them) the distributed optimizer
    wraps torch.optim.AdamW, which keeps a per-parameter "step" tensor:
    - its `state_dict()` (called by `sharded_state_dict`) asserts that a step exists, so a policy that
      has not taken a step yet cannot even describe what it wants to load: give it zero state first;
    - `load_state_dict` restores the step as *one* tensor object shared by every parameter, which
      Adam then increments once per parameter per step (wrong bias correction; measured: weights off
      by ~2e-4 after one step at lr 1e-3): every parameter gets its own copy afterwards;
    - it copies every state tensor the optimizer holds from the checkpoint, whose `fully_reshardable`
      entries deliberately omit "step" (KeyError): each copy is handed the step it already holds.
    """
    from megatron.core.optimizer import distrib_optimizer

    patched = []
    for opt in getattr(optimizer, "chained_optimizers", [optimizer]):
        if not isinstance(opt, distrib_optimizer.DistributedOptimizer) or distrib_optimizer.HAVE_APEX_OR_TE:
            continue
        if any("step" not in opt.optimizer.state[p] for group in opt.optimizer.param_groups for p in group["params"]):
            opt.init_state_fn(opt.optimizer, opt.config)
            for group in opt.optimizer.param_groups:
                for p in group["params"]:
                    opt.optimizer.state[p].setdefault("step", torch.tensor(0.0))
        original = opt._set_main_param_and_optimizer_states

        def set_states(model_param, tensors, _opt=opt, _original=original):
            group_index, group_order = _opt.model_param_group_index_map[model_param]
            main_param = _opt.optimizer.param_groups[group_index]["params"][group_order]
            step = _opt.optimizer.state[main_param].get("step")
            if step is not None and "step" not in tensors:
                tensors = {**tensors, "step": step}
            _original(model_param, tensors)

        opt._set_main_param_and_optimizer_states = set_states  # an instance attribute shadows the method
        patched.append(opt)
    try:
        yield
    finally:
        for opt in patched:
            del opt._set_main_param_and_optimizer_states
    for opt in patched:
        for state in opt.optimizer.state.values():
            if isinstance(state.get("step"), torch.Tensor):
                state["step"] = state["step"].clone()


def _sharded_training_state(policy: MegatronPolicy, metadata: dict, *, is_loading: bool) -> dict:
    model_sd = unwrap(policy.model[0]).sharded_state_dict(metadata=metadata)
    # The optimizer maps its state to the model's ShardedTensors by parameter identity, so it must get
    # the very dict that is saved/loaded (its keys become `optimizer.state.<kind>.<model key>`).
    # With is_loading=True it first allocates its state so that there is something to load into.
    optimizer_sd = policy.optimizer.sharded_state_dict(model_sd, is_loading=is_loading, metadata=metadata)
    return {"model": model_sd, "optimizer": optimizer_sd, "scheduler": policy.scheduler.state_dict()}


def _collective_check(error: BaseException | None) -> None:
    """Raise on every rank if rank 0 failed, instead of leaving the others waiting in a barrier."""
    box = [repr(error) if error is not None else None]
    dist.broadcast_object_list(box, src=0)
    if error is not None:
        raise error
    if box[0] is not None:
        raise RuntimeError(f"rank 0 failed while finishing the checkpoint: {box[0]}")


def save_training_state(policy: MegatronPolicy, directory: str | Path, trainer_state: dict) -> None:
    """Collective: every rank calls it. Writes model, optimizer, LR schedule and `trainer_state`.

    `trainer_state` must be JSON-serialisable (rank 0's copy is written). `directory` must not
    exist. All ranks return together once the checkpoint is complete under its final name.
    """
    from megatron.core import dist_checkpointing

    directory = Path(directory)
    tmp = _tmp_dir(directory)
    # Checked on every rank before any collective, so that all ranks raise instead of some hanging.
    if directory.exists():
        raise FileExistsError(f"{directory} exists; refusing to overwrite a checkpoint")
    text = json.dumps(trainer_state, indent=1, sort_keys=True)  # a TypeError here is raised on every rank too
    rank = dist.get_rank()
    error: BaseException | None = None
    if rank == 0:
        try:
            shutil.rmtree(tmp, ignore_errors=True)  # a previous attempt's leftovers
            tmp.mkdir(parents=True)
        except OSError as e:
            error = e
    _collective_check(error)

    metadata = _sharding_metadata(policy)
    sharded = _sharded_training_state(policy, metadata, is_loading=False)
    saved_metadata = {k: v for k, v in metadata.items() if k != "dp_cp_group"}
    dist_checkpointing.save(sharded, str(tmp), content_metadata=saved_metadata)
    dist.barrier()  # every rank's shards are on disk before the directory can become complete

    if rank == 0:
        try:
            # trainer_state.json is the completeness marker, hence written last, and the rename is
            # what publishes the directory under a checkpoint's name.
            write_text(tmp / TRAINER_STATE, text)
            os.rename(tmp, directory)
            fsync_dir(directory.parent)
        except OSError as e:
            error = e
    _collective_check(error)


def _check_complete(directory: Path) -> None:
    if not directory.is_dir():
        raise FileNotFoundError(f"{directory}: no such checkpoint directory")
    missing = [name for name in (TRAINER_STATE, "metadata.json") if not (directory / name).is_file()]
    if missing:
        raise FileNotFoundError(f"{directory}: not a complete training-state checkpoint (no {', '.join(missing)}); "
                                "an interrupted save leaves only a .tmp directory, so this one was not written by "
                                "save_training_state or was modified since")


def load_training_state(policy: MegatronPolicy, directory: str | Path) -> dict:
    """Collective: load model, optimizer and LR schedule into `policy`; returns the trainer state.

    The checkpoint may come from another TP/PP/DP layout (dist_checkpointing reshards; with the
    distributed optimizer, the `fully_reshardable` format written here allows it), not from the other
    optimizer kind. The LR schedule continues as saved: Megatron's scheduler takes its max/min LR,
    warm-up and decay lengths from the checkpoint over the recipe's. Raises FileNotFoundError for an
    incomplete directory and ValueError for one that does not fit the policy, both naming it; after
    an error during the load itself the policy's state is undefined.
    """
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.core import CheckpointingException
    from megatron.core.dist_checkpointing.validation import StrictHandling
    from torch.distributed.checkpoint.api import CheckpointException

    directory = Path(directory)
    _check_complete(directory)
    try:
        trainer_state = json.loads((directory / TRAINER_STATE).read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise ValueError(f"{directory / TRAINER_STATE}: unreadable trainer state ({e})") from None

    saved_metadata = dist_checkpointing.load_content_metadata(str(directory))
    if saved_metadata is None:
        raise CheckpointMismatchError(f"{directory}: no content metadata; a weights-only checkpoint (save_weights) "
                         "or one not written by save_training_state")
    saved_distopt = saved_metadata.get("distrib_optim_sharding_type") is not None
    if saved_distopt != _uses_distributed_optimizer(policy.optimizer):
        raise CheckpointMismatchError(
            f"{directory}: saved with optimizer.use_distributed_optimizer={saved_distopt}, this run has "
            f"{not saved_distopt}; the optimizer state formats differ, resume with the setting it was saved with")

    with _torch_adam_workarounds(policy.optimizer):
        sharded = _sharded_training_state(policy, _sharding_metadata(policy, saved_metadata), is_loading=True)
        try:
            # Raise on keys this run asks for that the checkpoint lacks (another architecture, a
            # weights-only checkpoint), rather than loading a partial state.
            state = dist_checkpointing.load(sharded, str(directory), strict=StrictHandling.RAISE_UNEXPECTED)
        except (CheckpointingException, CheckpointException) as e:
            # torch's CheckpointException wraps each rank's error with its traceback; keep the errors.
            failures = [f[0] if isinstance(f, tuple) else f for f in getattr(e, "failures", {}).values()]
            cause = "; ".join(sorted({str(f) for f in failures})) or str(e)
            raise CheckpointMismatchError(f"{directory}: checkpoint does not match this model/optimizer: "
                                          f"{' '.join(cause.split())}") from e
        _load_model_state(unwrap(policy.model[0]), state["model"], directory)
        policy.optimizer.load_state_dict(state["optimizer"])
    # OptimizerParamScheduler.load_state_dict *adds* the saved step count to its current one.
    policy.scheduler.num_steps = 0
    policy.scheduler.load_state_dict(state["scheduler"])
    return trainer_state


# -- checkpoint directories (plain file-system helpers; no collectives) ------------------------------


def checkpoint_dir(root: str | Path, step: int) -> Path:
    """Where the checkpoint taken after `step` optimizer steps lives."""
    return Path(root) / f"step_{step:07d}"


def _is_complete(path: Path) -> bool:
    return path.is_dir() and (path / TRAINER_STATE).is_file()


def list_checkpoints(root: str | Path) -> list[Path]:
    """Complete checkpoints (`step_XXXXXXX` holding trainer_state.json) under `root`, oldest first."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), path) for path in root.iterdir()
             if (m := _STEP_DIR.fullmatch(path.name)) and _is_complete(path)]
    return [path for _, path in sorted(found)]


def prune_checkpoints(root: str | Path, keep_last: int) -> list[Path]:
    """Delete complete checkpoints older than the newest `keep_last`, and stale `.tmp` directories.

    Call on rank 0 only, and not while a save is in progress (its `.tmp` directory would go).
    Returns the removed paths (as they were named before removal).
    """
    if keep_last < 1:
        raise ValueError(f"keep_last must be >= 1, got {keep_last}")
    root = Path(root)
    removed: list[Path] = []
    for path in list_checkpoints(root)[:-keep_last]:
        # Renamed out of the checkpoint namespace first: a crash half-way through rmtree must not
        # leave a half-deleted directory that still looks like a complete checkpoint.
        doomed = path.parent / f".{path.name}.deleting"
        shutil.rmtree(doomed, ignore_errors=True)
        os.rename(path, doomed)
        shutil.rmtree(doomed)
        removed.append(path)
    if root.is_dir():
        for path in sorted(root.iterdir()):
            if _STALE_TMP.fullmatch(path.name) and path.is_dir():
                shutil.rmtree(path)
                removed.append(path)
    return removed


def resolve_resume(resume: str, root: str | Path) -> Path | None:
    """The checkpoint to resume from: `checkpoint.resume` of the recipe against `checkpoint.dir`.

    "none": start fresh (None). "auto": the newest complete checkpoint under `root`, or None when
    there is none. Anything else is a path that must be a complete checkpoint.
    """
    if resume == "none":
        return None
    if resume == "auto":
        found = list_checkpoints(root)
        return found[-1] if found else None
    path = Path(resume)
    if not path.is_dir():
        hint = ""
        if (Path(root) / resume).is_dir():
            hint = f" (did you mean {Path(root) / resume}?)"
        raise FileNotFoundError(f"checkpoint.resume={resume}: no such checkpoint directory{hint}; "
                                f"use 'auto', 'none' or the path of a step_XXXXXXX directory")
    if not (path / TRAINER_STATE).is_file():
        raise FileNotFoundError(f"checkpoint.resume={resume}: {path} is not a complete training-state checkpoint "
                                f"(no {TRAINER_STATE}); complete ones under {root}: "
                                f"{[p.name for p in list_checkpoints(root)] or 'none'}")
    return path
