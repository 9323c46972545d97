"""Per-layer gradient norms (every `log_every_n_steps`) and histograms (every `histogram_every_n_steps`).

Hooked on `on_before_optimizer_step`, so it sees the gradients each optimizer is about to apply: after the
DDP all-reduce, after unscaling in mixed precision, and per network for GANs (the generator's optimizer
only holds generator parameters). Steps that log nothing cost one integer comparison.
"""

import math
from collections import defaultdict
from typing import Any

import lightning as L
import torch
from lightning.pytorch.loggers import WandbLogger

from trainer.loggers import log_step


def layer_name(param_name: str) -> str:
    """'generator.net.3.weight' -> 'generator.net.3': a layer is the module that owns the parameters."""
    return param_name.rpartition(".")[0] or param_name


class GradientMonitor(L.Callback):
    def __init__(self, log_every_n_steps: int = 50, histogram_every_n_steps: int = 500, bins: int = 64):
        if log_every_n_steps < 1 or histogram_every_n_steps < 0:
            raise ValueError("log_every_n_steps must be >= 1 and histogram_every_n_steps >= 0 (0 turns them off)")
        self.log_every_n_steps = log_every_n_steps
        self.histogram_every_n_steps = histogram_every_n_steps
        self.bins = bins
        self._names: dict[torch.nn.Parameter, str] = {}

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self._names = {p: layer_name(n) for n, p in pl_module.named_parameters()}

    def on_before_optimizer_step(
        self, trainer: L.Trainer, pl_module: L.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        step = log_step(trainer)
        log_norms = step % self.log_every_n_steps == 0
        log_hist = self.histogram_every_n_steps > 0 and step % self.histogram_every_n_steps == 0
        if not (log_norms or log_hist) or not trainer.loggers:
            return
        layers = self._grads_by_layer(optimizer)
        if not layers:
            return
        if log_norms:
            metrics = self.layer_norms(layers)
            for logger in trainer.loggers:
                logger.log_metrics(metrics, step=step)
        if log_hist and trainer.is_global_zero:
            self._log_histograms(trainer, layers, step)

    def _grads_by_layer(self, optimizer: torch.optim.Optimizer) -> dict[str, list[torch.Tensor]]:
        layers: dict[str, list[torch.Tensor]] = defaultdict(list)
        for group in optimizer.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    layers[self._names.get(p, "unnamed")].append(p.grad.detach())
        return layers

    @staticmethod
    def layer_norms(layers: dict[str, list[torch.Tensor]]) -> dict[str, float]:
        """L2 norm per layer and of all layers together; one fused kernel and one host sync for all layers."""
        grads = [g for gs in layers.values() for g in gs]
        norms = torch.stack(torch._foreach_norm(grads)).float()
        sizes = torch.tensor([len(gs) for gs in layers.values()], device=norms.device)
        owner = torch.repeat_interleave(torch.arange(len(layers), device=norms.device), sizes)
        per_layer = torch.zeros(len(layers), device=norms.device).index_add_(0, owner, norms.square()).sqrt()
        values = torch.cat([per_layer, per_layer.square().sum().sqrt().view(1)]).tolist()
        metrics = {f"grad_norm/{_panel(name)}": v for name, v in zip(layers, values)}
        metrics[f"grad_norm/{_network(layers)}/total"] = values[-1]
        return metrics

    def _log_histograms(self, trainer: L.Trainer, layers: dict[str, list[torch.Tensor]], step: int) -> None:
        import wandb

        flats = [torch.cat([g.float().flatten() for g in grads]) for grads in layers.values()]
        ranges = torch.stack([torch.stack(torch.aminmax(f)) for f in flats]).tolist()  # one host sync
        histograms: dict[str, Any] = {}
        for name, flat, (lo, hi) in zip(layers, flats, ranges):
            if not (math.isfinite(lo) and math.isfinite(hi)):
                continue  # a non-finite gradient has no histogram; its norm already shows it
            hi = hi if hi > lo else lo + 1e-12
            counts = torch.histc(flat, bins=self.bins, min=lo, max=hi).cpu().numpy()
            edges = torch.linspace(lo, hi, self.bins + 1).numpy()
            histograms[f"grad_hist/{_panel(name)}"] = wandb.Histogram(np_histogram=(counts, edges))
        for logger in trainer.loggers:
            if isinstance(logger, WandbLogger):
                logger.experiment.log({**histograms, "trainer/global_step": step})


def _panel(layer: str) -> str:
    """'generator.net.3' -> 'generator/net.3': W&B groups panels by path, so each network gets its own."""
    return layer.replace(".", "/", 1)


def _network(layers: dict[str, list[torch.Tensor]]) -> str:
    """The top-level module that all of one optimizer's layers belong to ('generator'), else 'all'."""
    tops = {name.split(".", 1)[0] for name in layers}
    return tops.pop() if len(tops) == 1 else "all"
