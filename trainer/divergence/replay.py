"""`python -m trainer.replay BUNDLE [--lr LR] [--clip NORM] [--precision P]`: re-run the step that diverged.

Loads a divergence bundle (see trainer/divergence/bundle.py), rebuilds the task from the bundle's config on
this machine (CPU unless --device says otherwise), restores the weights, optimizer states and RNG states,
and runs the task's own training step on the saved batch once, with hooks on every layer. It says whether
the failure "reproduced" or "did not reproduce", names the first layer whose output or gradient went
non-finite (or, for a spike, the layer whose gradient grew most relative to its weights), prints a
per-layer table and draws the event's picture again (replay.png beside the bundle: the series the guard
saw, with the per-layer gradient norms of the replay). --lr, --clip and --precision re-run the step with a
candidate fix.
"""

import argparse
import math
import os
import sys
import tempfile
import warnings
from pathlib import Path
from typing import Any

import lightning as L
import torch
from omegaconf import DictConfig, OmegaConf

from trainer.callbacks.rng import restore_rng
from trainer.divergence.bundle import load_bundle
from trainer.divergence.picture import draw_event
from trainer.errors import UserError
from trainer.metrics.gradients import grads as gradients
from trainer.metrics.gradients import layer_name, layer_owners, layers_of, params_by_layer, per_layer_norms
from trainer.reporting.console import setup_logging
from trainer.tasks.base import step_report


class ReplayProbe(L.Callback):
    """Restores the bundle's optimizer and RNG state, applies the fix under test, and watches every layer."""

    def __init__(self, bundle: dict[str, Any], lr: float | None, clip: float | None):
        self.bundle, self.lr, self.clip = bundle, lr, clip
        self.order: list[str] = []  # layers in the order their forward ran
        self.output_max: dict[str, float] = {}
        self.first_nonfinite_output: str | None = None
        self.grad_norms: dict[str, float] = {}
        self.param_norms: dict[str, float] = {}
        self.network_norms: dict[str, float] = {}  # grad_norm/<network>: what the guard watches
        self.losses: dict[str, float] = {}
        self.recording = True  # only the replayed step: not the epoch-end work that follows it

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # after rollbacks the guard scaled the rates
        lr_factor = self.bundle["detection"].get("lr_factor", 1.0)
        for optimizer, state in zip(trainer.optimizers, self.bundle["optimizer_states"], strict=True):
            optimizer.load_state_dict(state)
            for group in optimizer.param_groups:
                group["lr"] = self.lr if self.lr is not None else group["lr"] * lr_factor
            if self.clip is not None:
                optimizer.register_step_pre_hook(self._clip)
        for name, module in layers_of(pl_module).items():
            module.register_forward_hook(self._watch_output(name))

    def _clip(self, optimizer: torch.optim.Optimizer, *args: Any) -> None:
        params = [p for group in optimizer.param_groups for p in group["params"]]
        if self.clip is not None:  # (hooked only then)
            torch.nn.utils.clip_grad_norm_(params, self.clip)

    def on_train_batch_start(self, *args: Any) -> None:
        restore_rng(self.bundle["rng"])

    def _watch_output(self, name: str):
        def hook(module: torch.nn.Module, inputs: Any, output: Any) -> None:
            if not self.recording or not isinstance(output, torch.Tensor):
                return
            largest = output.detach().abs().float().max().item() if output.numel() else 0.0
            if name not in self.output_max:
                self.order.append(name)
            previous = self.output_max.get(name, 0.0)
            if math.isfinite(previous):  # once non-finite, the layer's row shows it
                self.output_max[name] = largest if not math.isfinite(largest) else max(previous, largest)
            if not math.isfinite(largest) and self.first_nonfinite_output is None:
                self.first_nonfinite_output = name

        return hook

    def on_before_optimizer_step(
        self, trainer: L.Trainer, pl_module: L.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        layers = params_by_layer(optimizer, {p: layer_name(n) for n, p in pl_module.named_parameters()})
        params = [p for ps in layers.values() for p in ps]
        if not params:
            return
        owners = layer_owners(layers, params[0].device)
        grads = per_layer_norms([g.float() for g in gradients(params)], owners, len(layers)).tolist()
        weights = per_layer_norms([p.detach().float() for p in params], owners, len(layers)).tolist()
        self.grad_norms.update(zip(layers, grads))  # the totals at the end fall outside the zip
        self.param_norms.update(zip(layers, weights))
        self.network_norms[f"grad_norm/{next(iter(layers)).split('.', 1)[0]}"] = grads[-1]

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, *args: Any
    ) -> None:
        report = step_report(pl_module, outputs)
        self.losses = {k: float(v) for k, v in report.losses.items()} if report is not None else {}
        self.recording = False

    def first_nonfinite_gradient(self) -> str | None:
        """The layer nearest the loss (backward runs from there) whose gradient is non-finite."""
        for layer in reversed(self.order):
            if layer in self.grad_norms and not math.isfinite(self.grad_norms[layer]):
                return layer
        return None

    def fastest_growing(self) -> str | None:
        ratios = {
            k: g / max(self.param_norms[k], 1e-12) for k, g in self.grad_norms.items() if math.isfinite(g)
        }
        return max(ratios, key=ratios.__getitem__) if ratios else None

    def nonfinite(self) -> bool:
        return (
            self.first_nonfinite_output is not None
            or self.first_nonfinite_gradient() is not None
            or any(not math.isfinite(v) for v in self.losses.values())
        )


def replay(
    path: str,
    lr: float | None = None,
    clip: float | None = None,
    precision: str = "32-true",
    device: str = "cpu",
) -> tuple[bool, ReplayProbe, dict[str, Any]]:
    """Re-runs the bundle's step; returns (reproduced, the probe with its readings, the bundle)."""
    from trainer.run import build_task

    bundle = load_bundle(path)
    cfg = OmegaConf.create(bundle["config"])
    if not isinstance(cfg, DictConfig) or not cfg:
        raise UserError(f"bundle {path} carries no config: it cannot be rebuilt")
    cfg.perf.compile, cfg.perf.channels_last = False, False
    _, module = build_task(cfg)
    module.load_state_dict(bundle["state_dict"])
    probe = ReplayProbe(bundle, lr, clip)
    with tempfile.TemporaryDirectory(prefix="trainer-replay-") as scratch:
        trainer = L.Trainer(
            accelerator=device,
            devices=1,
            precision=precision,  # pyright: ignore[reportArgumentType]  # (any name: Lightning checks it)
            max_epochs=1,
            limit_train_batches=1,
            limit_val_batches=0,
            num_sanity_val_steps=0,
            logger=False,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            callbacks=[probe],
            default_root_dir=scratch,
        )
        # (a list serves as a data set; torch declares a Dataset)
        batches = torch.utils.data.DataLoader([bundle["batch"]], batch_size=None)  # pyright: ignore[reportArgumentType]
        with warnings.catch_warnings():  # the replay trains on one batch and validates nothing, on purpose
            warnings.filterwarnings("ignore", message="You defined a `validation_step` but have no")
            trainer.fit(module, train_dataloaders=batches)
    detection = bundle["detection"]
    if detection["detector"] == "nonfinite":
        reproduced = probe.nonfinite()
    else:  # a spike or collapse: the same size of trouble again in the series that showed it
        again = {**probe.losses, **probe.network_norms}.get(detection["series"])
        reproduced = probe.nonfinite() or (again is not None and again >= 0.5 * abs(detection["value"]))
    return reproduced, probe, bundle


def draw_replay(path: Path, reproduced: bool, probe: ReplayProbe, bundle: dict[str, Any]) -> Path:
    """The event's picture with this replay's per-layer gradient norms."""
    detection = bundle["detection"]
    title = (
        f"replay of step {detection['step']} ({'reproduced' if reproduced else 'did not reproduce'}): "
        f"{detection['reason']}"
    )
    return draw_event(
        path,
        title,
        bundle["history"],
        detection["step"],
        probe.grad_norms,
        "gradient norm per layer in the replay",
    )


def report(reproduced: bool, probe: ReplayProbe, bundle: dict[str, Any], fix: str) -> str:
    detection = bundle["detection"]
    lines = [
        f"bundle: step {detection['step']} (epoch {bundle['epoch']}, batch {bundle['batch_idx']}"
        f"{f' of rank {rank}' if (rank := bundle.get('batch_rank')) else ''}): "
        f"{detection['reason']}"
    ]
    lines.append(f"replayed on this machine{fix}: " + ("reproduced" if reproduced else "did not reproduce"))
    if probe.first_nonfinite_output:
        lines.append(f"first layer with a non-finite output: {probe.first_nonfinite_output}")
    if probe.first_nonfinite_gradient():
        lines.append(
            f"first layer with a non-finite gradient (from the loss back): {probe.first_nonfinite_gradient()}"
        )
    if not probe.nonfinite() and probe.fastest_growing():
        lines.append(f"layer with the largest gradient for its weights: {probe.fastest_growing()}")
    lines.append("losses: " + ", ".join(f"{k}={v:.4g}" for k, v in probe.losses.items()))
    lines.append("")
    lines.append(f"{'layer':40}{'max |output|':>14}{'grad norm':>14}{'weight norm':>14}")
    for layer in probe.order:
        row = [probe.output_max.get(layer), probe.grad_norms.get(layer), probe.param_norms.get(layer)]
        lines.append(f"{layer:40}" + "".join(f"{v:14.4g}" if v is not None else f"{'-':>14}" for v in row))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m trainer.replay", description=(__doc__ or "").split("\n")[0]
    )
    parser.add_argument("bundle", help="a <run dir>/divergence/step... folder (or its bundle.pt)")
    parser.add_argument("--lr", type=float, help="re-run with this learning rate for every optimizer")
    parser.add_argument("--clip", type=float, help="re-run with gradients clipped to this global norm")
    parser.add_argument("--precision", default="32-true", help="re-run in this precision (e.g. bf16-mixed)")
    parser.add_argument("--device", default="cpu", help="cpu (default) or gpu")
    parser.add_argument("-v", "--verbose", action="store_true", help="show every library's messages")
    args = parser.parse_args(argv)
    setup_logging(None, verbose=args.verbose)
    fix = "".join(f" with {k}={v}" for k, v in (("lr", args.lr), ("clip", args.clip)) if v is not None)
    if args.precision != "32-true":
        fix += f" in {args.precision}"
    try:
        reproduced, probe, bundle = replay(args.bundle, args.lr, args.clip, args.precision, args.device)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(report(reproduced, probe, bundle, fix))
    folder = Path(args.bundle) if Path(args.bundle).is_dir() else Path(args.bundle).parent
    picture = (
        folder / "replay.png" if os.access(folder, os.W_OK) else Path.cwd() / f"replay-{folder.name}.png"
    )
    print(f"picture: {draw_replay(picture, reproduced, probe, bundle)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
