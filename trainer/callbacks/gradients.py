"""Per-layer training health: gradient norms, parameter norms and update-to-weight ratios (about every
`log_every_n_steps`), gradient histograms (about every `histogram_every_n_steps`), on Lightning's logging
steps (`trainer.log_every_n_steps`), the only steps whose values are read from the device: the first logging
step of each span of that many steps.

Hooked on each optimizer step, so it sees the gradients each optimizer is about to apply: after the DDP
all-reduce, after unscaling in mixed precision, and per network for GANs (the generator's optimizer only
holds generator parameters), once per optimizer and logging step (an RL step updates many times). On a
logging step the norms are computed with fused `_foreach` kernels and collected on the device; one host
sync at the end of the batch reads them all. Other steps cost one integer comparison.

Under FSDP each rank holds a part of every parameter and of its gradient: every rank measures its parts and
the sums of squares are added up over the ranks, so the numbers are the whole model's, as in a DDP run.
"""

import math
from typing import Any, NamedTuple

import lightning as L
import torch

from trainer.config.ranges import NonNegative, Positive
from trainer.distributed.fsdp import clean_name, is_sharded, sum_over_shards
from trainer.lightning_internals import is_logging_step, log_step
from trainer.metrics.gradients import grads, layer_name, layer_owners, params_by_layer, per_layer_norms
from trainer.reporting.loggers import wandb_loggers


class BeforeStep(NamedTuple):
    """A logging step's layers and weights, kept for the update-to-weight ratios after the step."""

    trainer: L.Trainer
    names: list[str]
    owners: torch.Tensor
    params: list[torch.nn.Parameter]
    before: tuple[torch.Tensor, ...]  # the weights before the update
    weights: torch.Tensor  # their per-layer norms


class GradientMonitor(L.Callback):
    def __init__(
        self,
        log_every_n_steps: Positive = 50,
        histogram_every_n_steps: NonNegative = 500,
        bins: Positive = 64,
    ):
        if log_every_n_steps < 1 or histogram_every_n_steps < 0:
            raise ValueError(
                "log_every_n_steps must be >= 1 and histogram_every_n_steps >= 0 (0 turns them off)"
            )
        self.log_every_n_steps = log_every_n_steps
        self.histogram_every_n_steps = histogram_every_n_steps
        self.bins = bins
        self._names: dict[torch.nn.Parameter, str] = {}
        self._hooked: set[int] = set()
        self._before_step: dict[int, BeforeStep] = {}  # optimizer -> what its post-step hook needs
        self._pending: list[tuple[list[str], torch.Tensor]] = []
        self._measured: dict[int, int] = {}  # optimizer -> the step its gradients were last measured at

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self._names = {p: layer_name(clean_name(n)) for n, p in pl_module.named_parameters()}

    def on_before_optimizer_step(
        self, trainer: L.Trainer, pl_module: L.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        step = log_step(trainer)
        if not is_logging_step(trainer) or not trainer.loggers or self._measured.get(id(optimizer)) == step:
            return
        log_norms = _first_logging_step_of_window(trainer, step, self.log_every_n_steps)
        log_hist = self.histogram_every_n_steps > 0 and _first_logging_step_of_window(
            trainer, step, self.histogram_every_n_steps
        )
        if not (log_norms or log_hist):
            return
        self._measured[id(optimizer)] = step  # an RL step updates many times: its first update speaks for it
        layers = params_by_layer(optimizer, self._names, sharded=is_sharded(trainer.strategy))
        if not layers:
            return
        if log_hist:
            self._log_histograms(trainer, {name: grads(ps) for name, ps in layers.items()}, step)
        if not log_norms:
            return
        names = list(layers)
        network = _network(names)
        params = [p for ps in layers.values() for p in ps]
        owners = layer_owners(layers, params[0].device)
        keys = [f"grad_norm/{_panel(n)}" for n in names] + [f"grad_norm/{network}/total"]
        keys += [f"param_norm/{_panel(n)}" for n in names] + [f"param_norm/{network}/total"]
        norms = per_layer_norms(grads(params), owners, len(names), trainer)
        weights = per_layer_norms([p.detach() for p in params], owners, len(names), trainer)
        self._pending.append((keys, torch.cat([norms, weights])))
        # The update is known after the step: keep the weights, and let the post-step hook finish.
        before = torch._foreach_mul([p.detach() for p in params], 1.0)  # pyright: ignore[reportPrivateImportUsage]
        self._before_step[id(optimizer)] = BeforeStep(trainer, names, owners, params, before, weights)
        if id(optimizer) not in self._hooked:
            optimizer.register_step_post_hook(self._after_step)
            self._hooked.add(id(optimizer))

    def _after_step(self, optimizer: torch.optim.Optimizer, *args: Any) -> None:
        pending = self._before_step.pop(id(optimizer), None)
        if pending is None:
            return
        trainer, names, owners, params, before, weights = pending
        network = _network(names)
        updates = per_layer_norms(
            torch._foreach_sub([p.detach() for p in params], before),  # pyright: ignore[reportPrivateImportUsage]
            owners,
            len(names),
            trainer,
        )
        keys = [f"update_ratio/{_panel(n)}" for n in names] + [f"update_ratio/{network}/total"]
        self._pending.append((keys, updates / weights.clamp(min=1e-12)))

    def on_train_batch_end(self, trainer: L.Trainer, *args: Any) -> None:
        if not self._pending:
            return
        keys = [k for ks, _ in self._pending for k in ks]
        values = torch.cat([v for _, v in self._pending]).tolist()  # the one host sync of a logging step
        self._pending.clear()
        metrics = dict(zip(keys, values))
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=log_step(trainer))

    def _log_histograms(self, trainer: L.Trainer, layers: dict[str, list[torch.Tensor]], step: int) -> None:
        """Sharded, every rank counts its part of each layer's gradient within the layer's global range."""
        import wandb

        sharded = is_sharded(trainer.strategy) and trainer.world_size > 1
        if not (sharded or trainer.is_global_zero):
            return
        flats = [torch.cat([g.float().flatten() for g in grads]) for grads in layers.values()]
        # Each layer's -min and max (so that one MAX reduces both); -inf for a rank's empty part.
        bounds = torch.stack(
            [torch.stack([-f.min(), f.max()]) if f.numel() else f.new_full((2,), -math.inf) for f in flats]
        )
        if sharded:
            torch.distributed.all_reduce(bounds, op=torch.distributed.ReduceOp.MAX)
        ranges = [(-lo, hi) for lo, hi in bounds.tolist()]  # one host sync
        counts = torch.stack(
            [
                torch.histc(flat, bins=self.bins, min=lo, max=max(hi, lo + 1e-12))
                if math.isfinite(lo) and math.isfinite(hi)
                else torch.zeros(self.bins, device=flat.device)  # non-finite: no histogram, the norm shows it
                for flat, (lo, hi) in zip(flats, ranges)
            ]
        )
        counts = sum_over_shards(trainer, counts)
        if not trainer.is_global_zero:
            return
        histograms: dict[str, Any] = {}
        for name, layer_counts, (lo, hi) in zip(layers, counts.cpu().numpy(), ranges):
            if math.isfinite(lo) and math.isfinite(hi):
                edges = torch.linspace(lo, max(hi, lo + 1e-12), self.bins + 1).numpy()
                histograms[f"grad_hist/{_panel(name)}"] = wandb.Histogram(np_histogram=(layer_counts, edges))
        for logger in wandb_loggers(trainer):
            logger.experiment.log({**histograms, "trainer/global_step": step})


def _first_logging_step_of_window(trainer: L.Trainer, step: int, every: int) -> bool:
    """Whether this logging step is the first one among steps [k * every, (k + 1) * every): measured there,
    a run's first logging step is measured, and then one about every `every` steps, whatever
    `trainer.log_every_n_steps` is, without state (a resumed run measures where the first run would have)."""
    logged_every = trainer.log_every_n_steps  # pyright: ignore[reportAttributeAccessIssue]  # set by Lightning
    return (step - max(logged_every, 1)) // every < step // every


def _panel(layer: str) -> str:
    """'generator.net.3' -> 'generator/net.3': W&B groups panels by path, so each network gets its own."""
    return layer.replace(".", "/", 1)


def _network(layers: list[str]) -> str:
    """The top-level module that all of one optimizer's layers belong to ('generator'), else 'all'."""
    tops = {name.split(".", 1)[0] for name in layers}
    return tops.pop() if len(tops) == 1 else "all"
