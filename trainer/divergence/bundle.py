"""The divergence bundle: everything needed to re-run the step that went wrong, in one safe file.

<run dir>/divergence/step<K>-<detector>/bundle.pt holds the offending batch (of the rank whose batch holds a
NaN or Inf, else rank 0's, with that rank's RNG states; `batch_rank`), the whole model and optimizer states
from before the bad update, the RNG states at the start of the batch (Python, NumPy, torch CPU and CUDA),
step, epoch and batch index, the resolved config, the last metrics, the recent history of every watched
series and the per-layer gradient norms of the step (what the event's picture shows). It is written
atomically and read with `weights_only=True`: tensors, numbers and strings only, no pickled code.
"""

from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning_utilities.core.apply_func import apply_to_collection

from trainer.checkpoint import SafeCheckpointIO
from trainer.distributed.fsdp import full_state
from trainer.errors import UserError

FORMAT = 2


def bundle_dir(run_dir: str | Path, step: int, detector: str) -> Path:
    return Path(run_dir) / "divergence" / f"step{step:06d}-{detector}"


def to_cpu(tree: Any) -> Any:
    return apply_to_collection(tree, torch.Tensor, lambda t: t.detach().cpu().clone())


def tensor_bytes(tree: Any) -> int:
    sizes: list[int] = []
    apply_to_collection(tree, torch.Tensor, lambda t: sizes.append(t.numel() * t.element_size()))
    return sum(sizes)


def write_bundle(
    trainer: L.Trainer,
    folder: Path,
    *,
    detection: dict[str, Any],
    batch: Any,
    rng: dict[str, Any],
    batch_idx: int,
    buffers_at_start: dict[str, torch.Tensor],
    history: dict[str, list[tuple[int, float]]],
    layer_grad_norms: dict[str, float],
    lrs: list[list[float]] | None = None,
) -> Path:
    """Weights and optimizer states are read now (a halt or rollback alarm froze them before the bad update);
    buffers that the forward pass has already moved (BatchNorm statistics) are taken from the start of the
    batch, and so are the learning rates (`lrs`, per optimizer and group), which schedulers have moved since.
    Called on every rank: the strategy gathers the whole model's state (under FSDP, each rank holds a part),
    rank 0 writes."""
    with full_state(trainer.strategy):
        model_state = trainer.strategy.lightning_module_state_dict()
        # (Lightning declares dict[str, Tensor]; an optimizer's state dict holds lists and dicts too)
        optimizer_states: list[dict[str, Any]] = [
            trainer.strategy.optimizer_state(o) for o in trainer.optimizers
        ]
    for state, group_lrs in zip(optimizer_states, lrs or []):
        # FSDP gathers the full optimizer state on rank 0 only; the other ranks hold empty dicts.
        for group, lr in zip(state.get("param_groups", []), group_lrs):
            group["lr"] = lr
    batch_rank, batch, rng = _culprit_batch(trainer, batch, rng)
    if not trainer.is_global_zero:
        return folder
    config_file = Path(trainer.default_root_dir) / "config.yaml"
    config = config_file.read_text() if config_file.is_file() else ""
    content = {
        "format": FORMAT,
        "detection": detection,
        "step": detection["step"],
        "global_step": trainer.global_step,
        "epoch": trainer.current_epoch,
        "batch_idx": batch_idx,
        "batch_rank": batch_rank,
        "state_dict": to_cpu({**model_state, **buffers_at_start}),
        "optimizer_states": to_cpu(optimizer_states),
        "rng": to_cpu(rng),
        "batch": to_cpu(batch),
        "metrics": {k: float(v) for k, v in trainer.callback_metrics.items()},
        "config": config,
        "history": history,
        "layer_grad_norms": layer_grad_norms,
    }
    folder.mkdir(parents=True, exist_ok=True)
    SafeCheckpointIO().save_checkpoint(content, folder / "bundle.pt")
    (folder / "config.yaml").write_text(config)
    (folder / "README.txt").write_text(
        f"{detection['reason']}\n\n"
        f"Replay this step (on CPU, anywhere):\n    python -m trainer.replay {folder}\n"
    )
    return folder


def _culprit_batch(trainer: L.Trainer, batch: Any, rng: dict[str, Any]) -> tuple[int, Any, dict[str, Any]]:
    """The rank whose batch holds a NaN or Inf (the first such; else rank 0), with its batch and RNG states:
    a bad record on any rank breaks every rank's update, and a replay in one process must run that one."""
    if trainer.world_size == 1 or not torch.distributed.is_initialized():
        return 0, batch, rng
    flags: list[bool] = [False] * trainer.world_size
    torch.distributed.all_gather_object(flags, _has_nonfinite(batch))
    rank = flags.index(True) if any(flags) else 0
    carried = [to_cpu((batch, rng))]
    torch.distributed.broadcast_object_list(carried, src=rank)
    return rank, *carried[0]


def _has_nonfinite(tree: Any) -> bool:
    found: list[bool] = []

    def check(t: torch.Tensor) -> None:
        found.append(t.is_floating_point() and not bool(t.isfinite().all()))

    apply_to_collection(tree, torch.Tensor, check)
    return any(found)


def load_bundle(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    file = path / "bundle.pt" if path.is_dir() else path
    if not file.is_file():
        raise UserError(f"no divergence bundle at {path}: pass a folder <run dir>/divergence/step...")
    try:
        content = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as e:
        raise UserError(
            f"divergence bundle {file} is corrupt or unsafe to load ({type(e).__name__}): "
            "it was cut short or is not a bundle"
        ) from None
    if not isinstance(content, dict) or content.get("format") != FORMAT:
        raise UserError(f"{file} is not a divergence bundle of format {FORMAT}")
    return content
