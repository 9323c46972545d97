"""The GPU path measured in one command: every exp trained on one GPU with `trainer=gpu`, eager and compiled,
timed after warm-up, against plain PyTorch loops, and its checkpoint and divergence bundle carried to CPU.

    python scripts/gpu_check.py              # on a machine with a GPU: meant to fit in 8 minutes on one H200
    python scripts/gpu_check.py --tiny       # on CPU, tiny sizes: proves every path (tests/test_gpu_check.py)
    python scripts/gpu_check.py --exps qa --modes compiled --checks baselines   # a part of it

For each exp (dcgan, detector, ppo, dqn, qa) and mode (eager: `perf.compile=false`; compiled:
`perf.compile=true`) it trains until warm-up is over, then times `--batches` batches: batches/s and items/s
(images, env steps, or tokens with their padding), the device synchronised only at the two ends of the timed
batches. The clock starts once the last 3 batches made no new graph
(`trainer.perf.profiling.compiled_graphs()`;
after `--max-warmup` batches at most). Reported: the graphs made after warm-up (0 unless a step recompiles),
and the compile time: the warm-up's time beyond its batches at the timed rate (compilation and first-use
costs). An eager run's warm-up (`--read-batches` batches) counts the host reads of tensor values that
trainer's code makes (`trainer.perf.profiling.HostReads`, per batch by `StepReads`), by line, on the steps
that are
not logging steps; counting stops before the clock starts, as its patched tensor methods cost time. Each
exp's last run then resumes from its checkpoint on CPU for two batches.

Baselines, in the same process on the same networks and loaders: the training loop of the PyTorch examples'
DCGAN (fp32, eager) in images/s (goal: trainer at least 2x), and for QA a plain loop over the same model and
batches (bf16 autocast, fused AdamW, gradient clipping at 1.0, eager) in tokens/s, with the model FLOPs
utilisation of each: per token 6 x parameters (outside the embeddings, which multiply nothing) + 12 x layers
x hidden x sequence length, against the device's dense bf16 peak (PEAK_BF16_TFLOPS; another device: TFLOP/s
only). A DCGAN run with a NaN injected at batch 3 halts and its bundle is replayed on CPU; the guard and the
gradient monitor are timed on against off (target: at most 3%).

Loggers are off (`logger=none`) and runs use `launcher=local`. Prints one table and writes the report as
JSON (--out, rewritten after each part, so that a run cut short keeps what it measured). Exits non-zero when
a check fails: a run's error, no resume on CPU, graphs made after warm-up, no bundle replay.
"""

import argparse
import collections
import contextlib
import json
import math
import os
import platform
import statistics
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning as L
import torch
import torch.nn as nn
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from trainer.cli.preflight import config_dir  # noqa: E402
from trainer.config.build import build  # noqa: E402
from trainer.divergence.replay import replay  # noqa: E402
from trainer.errors import DivergenceHalt  # noqa: E402
from trainer.perf.profiling import DeviceSyncs, HostReads, StepReads, compiled_graphs  # noqa: E402
from trainer.run import train  # noqa: E402

QUIET = [
    "logger=none",
    "launcher=local",
    "++trainer.enable_progress_bar=false",
    "++trainer.limit_val_batches=0",
]
CPU = ["trainer=cpu", "perf.compile=false", "perf.channels_last=false", "perf.matmul_precision=null"]
CPU_DATA = ["++data.num_workers=0", "++data.pin_memory=false"]
MODES = {
    "eager": ["perf.compile=false"],
    "compiled": ["perf.compile=true"],
    # Not run unless asked (--modes): the GPU preset's bf16 and channels_last against plain fp32, which may
    # launch fewer kernels for a small network; and inductor's CUDA graphs, one launch per compiled graph.
    "fp32": ["perf.compile=false", "++trainer.precision=32-true", "perf.channels_last=false"],
    "graphs": ["perf.compile=true", "perf.compile_mode=reduce-overhead"],
}
DEFAULT_MODES = ("eager", "compiled")
COMPILED = ("compiled", "graphs")
CHECKS = ("baselines", "bundle", "guard")

# exp -> (the exp at GPU size, the same tiny for --tiny); every run adds QUIET and the device's preset.
EXPS: dict[str, tuple[list[str], list[str]]] = {
    "dcgan": (
        ["+exp=dcgan", "data.batch_size=256"],
        [
            "+exp=dcgan",
            "model.generator.width=8",
            "model.discriminator.width=8",
            "data.image_size=16",
            "data.batch_size=16",
        ],
    ),
    "detector": (
        ["+exp=detector"],
        ["+exp=detector", "data.canvases.train_images=16", "data.canvases.val_images=4", "data.batch_size=4"],
    ),
    "ppo": (
        ["+exp=ppo", "task.num_envs=64"],
        ["+exp=ppo", "task.num_steps=32", "task.env_steps_per_epoch=1024", "task.eval_episodes=1"],
    ),
    "dqn": (
        ["+exp=dqn", "task.learning_starts=0"],
        ["+exp=dqn", "task.learning_starts=0", "task.updates_per_step=5", "task.eval_episodes=1"],
    ),
    "qa": (
        ["+exp=qa", "data.batch_size=64"],
        [
            "+exp=qa",
            "data.max_length=64",
            "data.doc_stride=16",
            "data.batch_size=2",
            "data.facts.train_paragraphs=8",
        ],
    ),
}
UNITS = {"dcgan": "images", "detector": "images", "ppo": "env steps", "dqn": "env steps", "qa": "tokens"}
SETTLE = 3  # the clock starts after this many consecutive batches that made no new compiled graph
# Dense bf16 tensor-core peaks (NVIDIA's data sheets, without sparsity), by torch.cuda.get_device_name().
PEAK_BF16_TFLOPS = {
    "NVIDIA H200": 989.0,
    "NVIDIA H100 80GB HBM3": 989.0,  # H100 SXM
    "NVIDIA H100 PCIe": 756.0,
    "NVIDIA A100-SXM4-80GB": 312.0,
    "NVIDIA A100-SXM4-40GB": 312.0,
    "NVIDIA A100 80GB PCIe": 312.0,
    "NVIDIA A100-PCIE-40GB": 312.0,
}


@dataclass
class Settings:
    tiny: bool
    device: list[str]  # the device's preset overrides
    backend: list[str]  # the perf.compile_backend override, or none
    modes: list[str]
    batches: int  # timed batches per run
    read_batches: int  # an eager run's warm-up, whose host reads are counted
    max_warmup: int  # a compiled run's warm-up at most, settled or not
    rounds: int  # guard on/off rounds
    scratch: Path

    def sizes(self, exp: str) -> list[str]:
        return EXPS[exp][1 if self.tiny else 0]


def compose_config(*overrides: str, run_dir: Path) -> DictConfig:
    with initialize_config_dir(config_dir(), version_base="1.3"):
        return compose("config", overrides=[*overrides, f"run_dir={run_dir}"])


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _error(e: BaseException) -> str:
    return f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"


class Clock(L.Callback):
    """Warm-up, then `batches` timed batches, then a stop.

    The clock starts at the start of a batch once at least `min_warmup` batches have run and the last SETTLE
    of them made no new compiled graph, or after `max_warmup` batches. The device is synchronised at the two
    ends of the timed batches only, so that they run as they would unobserved; `on_start` runs as the clock
    starts."""

    def __init__(
        self, batches: int, min_warmup: int, max_warmup: int, on_start: Callable[[], None] = lambda: None
    ) -> None:
        self.batches, self.on_start = batches, on_start
        self.min_warmup, self.max_warmup = min_warmup, max_warmup
        self.built = time.perf_counter()
        self.graphs: list[int] = []  # compiled graphs at the start of each warm-up batch
        self.first_start: float | None = None
        self.first_step_end: float | None = None
        self.t0: float | None = None
        self.seconds: float | None = None  # of the timed batches, once all have run
        self.warmup_batches = 0
        self.settled = False
        self.timed = 0
        self.items = 0.0  # images or tokens of the timed batches; env steps for RL
        self.token_shapes: list[tuple[int, ...]] = []  # token batches' (batch, sequence), for FLOPs
        self.new_graphs = 0  # made by the timed batches

    def on_train_batch_start(
        self, trainer: L.Trainer, module: L.LightningModule, batch: Any, *args: Any
    ) -> None:
        now = time.perf_counter()
        self.first_start = self.first_start or now
        if self.t0 is None:
            self._maybe_start(module)
        if self.t0 is not None and isinstance(batch, dict) and "input_ids" in batch:
            self.token_shapes.append(tuple(batch["input_ids"].shape))
        if self.t0 is not None and not hasattr(module, "env_steps"):
            self.items += items_in(batch)

    def _maybe_start(self, module: L.LightningModule) -> None:
        self.graphs.append(compiled_graphs())
        done = len(self.graphs) - 1
        self.settled = done >= SETTLE and self.graphs[-1] == self.graphs[-1 - SETTLE]
        if (done >= self.min_warmup and self.settled) or done >= self.max_warmup:
            self.on_start()
            _sync()
            self.t0, self.warmup_batches = time.perf_counter(), done
            self.items = -float(getattr(module, "env_steps", 0))

    def on_train_batch_end(self, trainer: L.Trainer, module: L.LightningModule, *args: Any) -> None:
        if self.first_step_end is None:
            _sync()
            self.first_step_end = time.perf_counter() - self.built
        if self.t0 is None:
            return
        self.timed += 1
        if self.timed == self.batches:
            _sync()
            self.seconds = time.perf_counter() - self.t0
            self.items += float(getattr(module, "env_steps", 0))
            self.new_graphs = compiled_graphs() - self.graphs[-1]
            trainer.should_stop = True

    def rates(self) -> tuple[float, float]:
        """(batches/s, items/s) of the timed batches; NaN if the run ended before they were all done."""
        if self.seconds is None:
            return math.nan, math.nan
        return self.batches / self.seconds, self.items / self.seconds

    def warmup_excess(self) -> float | None:
        """Seconds the warm-up took beyond its batches at the timed rate."""
        if self.seconds is None or self.t0 is None or self.first_start is None:
            return None
        return self.t0 - self.first_start - self.warmup_batches * self.seconds / self.batches


def items_in(batch: Any) -> float:
    """Images in an image batch, tokens in a token batch."""
    if isinstance(batch, torch.Tensor):
        return batch.shape[0]
    if isinstance(batch, dict):
        return batch["input_ids"].numel() if "input_ids" in batch else 0
    if isinstance(batch, (list, tuple)) and batch:
        return len(batch[0]) if isinstance(batch[0], (list, tuple)) else items_in(batch[0])
    return 0


def run(overrides: list[str], run_dir: Path, *callbacks: L.Callback, **kwargs: Any) -> dict[str, Any]:
    """One training run with `callbacks` first among its callbacks, in this order."""
    cfg = compose_config(*overrides, *QUIET, run_dir=run_dir)
    return train(cfg, prepare=lambda t: _first(t, callbacks), **kwargs)


def _first(pl_trainer: L.Trainer, callbacks: Iterable[L.Callback]) -> L.Trainer:
    pl_trainer.callbacks[:0] = list(callbacks)
    return pl_trainer


# -- the exps ------------------------------------------------------------------------------------------------


def check_exp(name: str, s: Settings) -> list[dict[str, Any]]:
    """One row per mode; the last run that trained resumes on CPU from its checkpoint."""
    rows = [measure(name, mode, s) for mode in s.modes]
    trained = [(row, mode) for row, mode in zip(rows, s.modes) if "error" not in row]
    if trained:
        row, mode = trained[-1]
        row.update(resume_on_cpu(name, s.scratch / f"{name}-{mode}", s))
    return rows


def measure(name: str, mode: str, s: Settings) -> dict[str, Any]:
    """A timed run; an eager one counts its warm-up's host reads."""
    overrides = [*s.sizes(name), *s.device, *MODES[mode], *(s.backend if mode in COMPILED else [])]
    counting = mode == "eager"
    reads, syncs = HostReads(), DeviceSyncs()  # trainer's reads; on a GPU also every wait, anyone's
    step_reads, step_syncs = StepReads(reads), StepReads(syncs)
    if counting:  # the warm-up's reads; no patched tensor methods or sync warnings while timing

        def stop_counting() -> None:
            reads.__exit__(None, None, None)
            syncs.__exit__(None, None, None)

        clock = Clock(s.batches, s.read_batches, max_warmup=s.read_batches, on_start=stop_counting)
    else:
        clock = Clock(s.batches, min_warmup=1, max_warmup=s.max_warmup)
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    started = time.perf_counter()
    try:
        with reads if counting else contextlib.nullcontext(), syncs if counting else contextlib.nullcontext():
            counters = [step_reads, step_syncs] if counting else []
            run(overrides, s.scratch / f"{name}-{mode}", *counters, clock)
    except Exception as e:  # one run's failure is a row of the table, not the end of the check
        traceback.print_exc()
        return {"exp": name, "mode": mode, "error": _error(e)}
    batches_per_s, items_per_s = clock.rates()
    row: dict[str, Any] = {
        "exp": name,
        "mode": mode,
        "batches_per_s": batches_per_s,
        "items_per_s": items_per_s,
        "unit": UNITS[name],
        "timed_batches": clock.timed,
        "warmup_batches": clock.warmup_batches,
        "warmup_settled": clock.settled,
        "graphs_after_warmup": clock.new_graphs,
        "compile_s": clock.warmup_excess() if mode in COMPILED else None,
        "peak_gib": torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else None,
        "first_step_s": clock.first_step_end,
        "wall_s": time.perf_counter() - started,
        "host_reads": summarize_reads(step_reads.batches[: clock.warmup_batches]) if counting else None,
        "device_syncs": (
            summarize_reads(step_syncs.batches[: clock.warmup_batches])
            if counting and torch.cuda.is_available()
            else None
        ),
        "token_shapes": clock.token_shapes,
        "seconds": clock.seconds,
    }
    if clock.seconds is None:
        row["error"] = f"the run ended after {clock.timed} of {s.batches} timed batches"
    return row


def summarize_reads(batches: list[tuple[bool, collections.Counter[str]]]) -> dict[str, Any]:
    """Host reads per step outside logging steps and the lines that make them, from the second batch on (the
    first one's, first use included, apart), and per logging step."""
    if not batches:
        return {"first_batch": None, "steps": 0, "per_step": None, "by_line": {}, "logging_steps": 0}
    later = batches[1:]
    quiet = [reads for logging, reads in later if not logging]
    logged = [reads for logging, reads in later if logging]
    by_line = sum(quiet, collections.Counter())
    return {
        "first_batch": batches[0][1].total(),
        "steps": len(quiet),
        "per_step": by_line.total() / len(quiet) if quiet else None,
        "by_line": dict(by_line.most_common()),
        "logging_steps": len(logged),
        "per_logging_step": sum(c.total() for c in logged) / len(logged) if logged else None,
    }


def resume_on_cpu(name: str, run_dir: Path, s: Settings) -> dict[str, Any]:
    """Two more batches on CPU from the device run's last checkpoint."""
    last = run_dir / "checkpoints" / "last.ckpt"
    try:
        state = torch.load(last, map_location="cpu", weights_only=True)
        # max_epochs lifted, as a run stopped mid-epoch counts that epoch as done, and max_steps within the
        # length a one-cycle schedule was planned for (a longer run is refused).
        planned = [x["total_steps"] for x in state.get("lr_schedulers", []) if "total_steps" in x]
        resume = [
            *s.sizes(name),
            *CPU,
            *CPU_DATA,
            "++trainer.max_epochs=1000",
            *([f"++trainer.max_steps={min(planned)}"] if planned else []),
        ]
        resumed_dir = s.scratch / f"{name}-cpu"
        clock = Clock(2, min_warmup=0, max_warmup=0)
        run(resume, resumed_dir, clock, ckpt_path=str(last))
        after = torch.load(resumed_dir / "checkpoints" / "last.ckpt", weights_only=True)["global_step"]
        return {"resumes_on_cpu": after > state["global_step"] and clock.timed == 2}
    except Exception as e:
        traceback.print_exc()
        return {"resumes_on_cpu": False, "resume_error": _error(e)}


# -- the other checks ----------------------------------------------------------------------------------------


def check_bundle(s: Settings) -> dict[str, Any]:
    """A NaN batch at batch 3 halts the device run; its bundle replays on CPU and reproduces."""
    run_dir = s.scratch / "halt"
    with contextlib.suppress(DivergenceHalt):
        halt = ["divergence.inject.step=3", "divergence.action=halt"]
        run([*s.sizes("dcgan"), *s.device, *halt], run_dir, Clock(10, 0, 0))
    bundles = sorted((run_dir / "divergence").glob("step*/bundle.pt"))
    if not bundles:
        return {"bundle_replays_on_cpu": False, "bundle_error": "no bundle written"}
    reproduced, _, _ = replay(str(bundles[0].parent), device="cpu")
    return {"bundle_replays_on_cpu": bool(reproduced)}


def check_guard(s: Settings) -> dict[str, Any]:
    """Seconds per batch with the guard and the gradient monitor on, over off: medians of alternating runs in
    the device's preset."""
    base = [*s.sizes("dcgan"), *s.device]
    off = ["divergence=off", "~callbacks.gradients"]
    seconds: dict[bool, list[float]] = {True: [], False: []}
    for r in range(s.rounds):
        for on in (True, False):
            clock = Clock(s.batches, min_warmup=SETTLE, max_warmup=s.max_warmup)
            run([*base, *([] if on else off)], s.scratch / f"guard-{r}-{on}", clock)
            seconds[on].append(1 / clock.rates()[0])
    return {
        "guard_and_monitor_over_off": statistics.median(seconds[True]) / statistics.median(seconds[False])
    }


def time_plain_loop(
    data: L.LightningDataModule, step: Callable[[Any], float], warmup: int, batches: int
) -> tuple[float, float]:
    """(batches/s, items/s) of `step` (which returns the items it trained on) over the data module's
    training loader, epoch after epoch: `batches` batches after `warmup`, the device synchronised at the two
    ends only."""
    done, items, t0 = 0, 0.0, 0.0
    while True:
        for batch in data.train_dataloader():
            if done == warmup:
                _sync()
                t0, items = time.perf_counter(), 0.0
            items += step(batch)
            done += 1
            if done == warmup + batches:
                _sync()
                seconds = time.perf_counter() - t0
                return batches / seconds, items / seconds


def plain_setup(
    overrides: list[str], s: Settings, mode: str = "eager"
) -> tuple[DictConfig, L.LightningDataModule, torch.device]:
    """The config, fitted data module and device of a plain loop over an exp's networks and the loader of
    trainer's `mode` (a compiled run's batches may be padded to one shape); the loop itself is eager."""
    cfg = compose_config(*overrides, *s.device, *MODES[mode], run_dir=Path(tempfile.mkdtemp()))
    L.seed_everything(cfg.seed, verbose=False)
    data = build(cfg.data, "data")
    data.setup("fit")
    return cfg, data, torch.device("cuda" if torch.cuda.is_available() and not s.tiny else "cpu")


def examples_dcgan_images_per_s(s: Settings) -> float:
    """The training loop of github.com/pytorch/examples dcgan/main.py, written the way it is written there
    (fp32, eager, BCE on D's output, one D step on real and fake, one G step), on the exp's networks and data
    loader. D returns logits here, so the loss is BCEWithLogits: the example's Sigmoid + BCELoss."""
    cfg, data, device = plain_setup(s.sizes("dcgan"), s)
    netG = build(cfg.model.generator, "g").to(device)
    netD = build(cfg.model.discriminator, "d").to(device)
    criterion = nn.BCEWithLogitsLoss()
    optimizerD = torch.optim.Adam(netD.parameters(), lr=cfg.task.lr, betas=(cfg.task.beta1, 0.999))
    optimizerG = torch.optim.Adam(netG.parameters(), lr=cfg.task.lr, betas=(cfg.task.beta1, 0.999))
    real_label, fake_label = 1.0, 0.0

    def step(data_batch: torch.Tensor) -> float:
        # (1) Update D network: maximize log(D(x)) + log(1 - D(G(z)))
        netD.zero_grad()
        real_cpu = data_batch.to(device)
        b_size = real_cpu.size(0)
        label = torch.full((b_size,), real_label, dtype=torch.float, device=device)
        output = netD(real_cpu).view(-1)
        errD_real = criterion(output, label)
        errD_real.backward()
        noise = torch.randn(b_size, netG.latent_dim, device=device)
        fake = netG(noise)
        label.fill_(fake_label)
        output = netD(fake.detach()).view(-1)
        errD_fake = criterion(output, label)
        errD_fake.backward()
        optimizerD.step()
        # (2) Update G network: maximize log(D(G(z)))
        netG.zero_grad()
        label.fill_(real_label)
        output = netD(fake).view(-1)
        errG = criterion(output, label)
        errG.backward()
        optimizerG.step()
        return b_size

    return time_plain_loop(data, step, warmup=SETTLE, batches=s.batches)[1]


@dataclass
class QASpec:
    """What a QA encoder's training FLOPs depend on."""

    parameters: int  # outside the embeddings: a lookup multiplies nothing
    embedding_parameters: int
    layers: int
    hidden: int

    def flops(self, token_shapes: list[tuple[int, ...]]) -> float:
        """Training FLOPs of these (batch, sequence) batches: per token 6 x parameters (2 forward, 4 backward
        per weight) + 12 x layers x hidden x sequence (attention's scores and weighted sums, both ways)."""
        return sum(
            b * n * (6 * self.parameters + 12 * self.layers * self.hidden * n) for b, n in token_shapes
        )


def qa_spec(model: nn.Module) -> QASpec:
    embeddings = {id(p) for m in model.modules() if isinstance(m, nn.Embedding) for p in m.parameters()}
    total = sum(p.numel() for p in model.parameters())
    embedded = sum(p.numel() for p in model.parameters() if id(p) in embeddings)
    config = model.config
    return QASpec(total - embedded, embedded, config.num_hidden_layers, config.hidden_size)


def plain_qa(s: Settings, mode: str) -> tuple[float, QASpec, list[tuple[int, ...]], float]:
    """A plain loop over the exp's model and the batches of trainer's `mode`: bf16 autocast, fused AdamW, the
    exp's gradient clipping. (tokens/s, the model's FLOPs spec, the timed batches' shapes, their seconds)."""
    cfg, data, device = plain_setup(s.sizes("qa"), s, mode)
    model = build(cfg.model.encoder, "model.encoder").to(device)
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=cfg.task.lr, weight_decay=cfg.task.weight_decay, fused=True
    )
    clip = cfg.trainer.gradient_clip_val
    shapes: list[tuple[int, ...]] = []

    def step(batch: dict[str, torch.Tensor]) -> float:
        batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
        with torch.autocast(device.type, dtype=torch.bfloat16):
            loss = model(**batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        shapes.append(tuple(batch["input_ids"].shape))
        return batch["input_ids"].numel()

    batches_per_s, tokens_per_s = time_plain_loop(data, step, warmup=SETTLE, batches=s.batches)
    return tokens_per_s, qa_spec(model), shapes[SETTLE:], s.batches / batches_per_s


def peak_tflops(device_name: str) -> float | None:
    return PEAK_BF16_TFLOPS.get(device_name)


def check_baselines(rows: list[dict[str, Any]], s: Settings, device_name: str) -> dict[str, Any]:
    """The plain loops of the selected exps among dcgan and qa; trainer's items/s over theirs, per mode."""
    timed = {(r["exp"], r["mode"]): r for r in rows if "error" not in r}
    found: dict[str, Any] = {}
    exps = {r["exp"] for r in rows}
    if "dcgan" in exps:
        examples = examples_dcgan_images_per_s(s)
        found["dcgan"] = {
            "examples_images_per_s": examples,
            "trainer_over_examples": ratios(timed, "dcgan", examples),
        }
    if "qa" in exps:
        found["qa"] = qa_baselines(timed, s, peak_tflops(device_name))
    return found


def qa_baselines(
    timed: dict[tuple[str, str], dict[str, Any]], s: Settings, peak: float | None
) -> dict[str, Any]:
    """Per mode, the plain loop over that mode's batches against trainer's run: tokens/s, model TFLOP/s and,
    on a device of the peak table, MFU."""
    by_mode: dict[str, dict[str, float]] = {}
    for mode in s.modes:
        tokens_per_s, spec, shapes, seconds = plain_qa(s, mode)
        found = {
            "plain_tokens_per_s": tokens_per_s,
            "plain_tflops_per_s": spec.flops(shapes) / seconds / 1e12,
        }
        if row := timed.get(("qa", mode)):
            found["trainer_over_plain"] = row["items_per_s"] / tokens_per_s
            found["trainer_tflops_per_s"] = spec.flops(row["token_shapes"]) / row["seconds"] / 1e12
        for who in ("plain", "trainer"):
            if peak and f"{who}_tflops_per_s" in found:
                found[f"{who}_mfu"] = found[f"{who}_tflops_per_s"] / peak
        by_mode[mode] = found
    return {
        "parameters": spec.parameters,
        "embedding_parameters": spec.embedding_parameters,
        "peak_bf16_tflops": peak,
        "by_mode": by_mode,
    }


def ratios(timed: dict[tuple[str, str], dict[str, Any]], exp: str, baseline: float) -> dict[str, float]:
    return {mode: row["items_per_s"] / baseline for (e, mode), row in timed.items() if e == exp}


# -- the report ----------------------------------------------------------------------------------------------


def _f(value: float | None, spec: str) -> str:
    return "-" if value is None or (isinstance(value, float) and math.isnan(value)) else format(value, spec)


def table(rows: list[dict[str, Any]]) -> str:
    head = (
        f"{'exp':9}{'mode':9}{'batches/s':>10}{'items/s':>11}  {'unit':10}{'warm-up':>8}{'compile s':>10}"
        f"{'graphs+':>8}{'reads/step':>11}{'peak GiB':>9}{'1st step s':>11}  resumes on CPU"
    )
    lines = [head]
    for r in rows:
        if "batches_per_s" not in r:
            lines.append(f"{r['exp']:9}{r['mode']:9}failed: {r['error']}")
            continue
        reads = (r["host_reads"] or {}).get("per_step")
        resumed = {None: "-", True: "yes", False: f"NO ({r.get('resume_error', '')})"}[
            r.get("resumes_on_cpu")
        ]
        lines.append(
            f"{r['exp']:9}{r['mode']:9}{_f(r['batches_per_s'], '10.2f')}{_f(r['items_per_s'], '11.0f')}  "
            f"{r['unit']:10}{r['warmup_batches']:8d}{_f(r['compile_s'], '.1f'):>10}"
            f"{r['graphs_after_warmup']:8d}{_f(reads, '.1f'):>11}{_f(r['peak_gib'], '.2f'):>9}"
            f"{_f(r['first_step_s'], '11.1f')}  {resumed}"
        )
    return "\n".join(lines)


def reads_lines(rows: list[dict[str, Any]], key: str = "host_reads") -> list[str]:
    lines = []
    for r in rows:
        reads = r.get(key)
        if reads and reads["by_line"]:
            where = ", ".join(f"{line} {n / reads['steps']:g}" for line, n in reads["by_line"].items())
            lines.append(f"  {r['exp']}: {where}")
    return lines


def baseline_lines(found: dict[str, Any]) -> list[str]:
    lines = []
    if "dcgan" in found:
        d = found["dcgan"]
        times = ", ".join(f"{mode} {x:.2f}x" for mode, x in d["trainer_over_examples"].items())
        lines.append(
            f"dcgan: the PyTorch examples' loop (fp32, eager) {d['examples_images_per_s']:.0f} images/s; "
            f"trainer {times} (goal: 2x)"
        )
    for mode, m in found.get("qa", {}).get("by_mode", {}).items():
        plain = f"{m['plain_tokens_per_s']:.0f} tokens/s, {m['plain_tflops_per_s']:.3g} TFLOP/s"
        ours = (
            f"{_f(m.get('trainer_over_plain'), '.2f')}x, {_f(m.get('trainer_tflops_per_s'), '.3g')} TFLOP/s"
        )
        mfu = (
            f"MFU plain {_f(m['plain_mfu'], '.1%')}, trainer {_f(m.get('trainer_mfu'), '.1%')}"
            if "plain_mfu" in m
            else "MFU: no peak known for this device"
        )
        lines.append(
            f"qa over the {mode} run's batches: a plain loop (bf16 autocast, fused AdamW, clipping) {plain}; "
            f"trainer {ours}; {mfu}"
        )
    return lines


def attempt(part: str, check: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    """A check's findings, or its error: the parts after it still run."""
    try:
        return check()
    except Exception as e:
        traceback.print_exc()
        return {f"{part}_error": _error(e)}


def failures(report: dict[str, Any]) -> list[str]:
    failed = [f"{r['exp']} {r['mode']}: {r['error']}" for r in report["exps"] if "error" in r]
    failed += [f"{key[: -len('_error')]}: {value}" for key, value in report.items() if key.endswith("_error")]
    failed += [
        f"{r['exp']} {r['mode']}: {r['graphs_after_warmup']} graphs after warm-up"
        for r in report["exps"]
        if r.get("graphs_after_warmup")
    ]
    failed += [
        f"{r['exp']} {r['mode']}: no resume on CPU"
        for r in report["exps"]
        if r.get("resumes_on_cpu") is False
    ]
    if report.get("bundle_replays_on_cpu") is False:
        failed.append("the bundle does not replay on CPU")
    return failed


def settings(args: argparse.Namespace) -> Settings:
    on_gpu = torch.cuda.is_available() and not args.tiny
    perf = compose_config(run_dir=Path(tempfile.gettempdir())).perf
    backend = args.backend or ("eager" if args.tiny else None)  # tiny: graphs without code generation
    if args.backend and "compile_backend" not in perf:
        sys.exit("--backend: this config has no perf.compile_backend")
    return Settings(
        tiny=args.tiny,
        device=["trainer=gpu"] if on_gpu else [*CPU, *CPU_DATA],
        backend=[f"perf.compile_backend={backend}"] if backend and "compile_backend" in perf else [],
        modes=args.modes.split(","),
        batches=args.batches or (4 if args.tiny else 20),
        read_batches=args.read_batches or (4 if args.tiny else 12),
        max_warmup=args.max_warmup or (8 if args.tiny else 20),
        rounds=1 if args.tiny else args.rounds,
        scratch=Path(tempfile.mkdtemp(prefix="gpu-check-")),
    )


def parse() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=" ".join(__doc__.split("\n\n")[0].split()))
    parser.add_argument("--tiny", action="store_true", help="CPU, tiny sizes: proves the script")
    parser.add_argument("--exps", default=",".join(EXPS), help="comma-separated subset of " + ",".join(EXPS))
    parser.add_argument(
        "--modes", default=",".join(DEFAULT_MODES), help="comma-separated subset of " + ",".join(MODES)
    )
    parser.add_argument(
        "--checks", default=",".join(CHECKS), help="comma-separated subset of " + ",".join(CHECKS)
    )
    parser.add_argument("--batches", type=int, help="timed batches per run (default 20; --tiny 4)")
    parser.add_argument(
        "--read-batches", type=int, help="eager warm-up, reads counted (default 12; --tiny 4)"
    )
    parser.add_argument("--max-warmup", type=int, help="compiled warm-up at most (default 20; --tiny 8)")
    parser.add_argument("--rounds", type=int, default=2, help="guard on/off rounds (--tiny: 1)")
    parser.add_argument(
        "--backend", help="perf.compile_backend of compiled runs (default: the config's; --tiny: eager)"
    )
    parser.add_argument("--out", default="gpu_check.json")
    args = parser.parse_args()
    for given, known in ((args.exps, EXPS), (args.modes, MODES), (args.checks, CHECKS)):
        if unknown := set(given.split(",")) - set(known):
            parser.error(f"unknown: {', '.join(sorted(unknown))}")
    return args


def main() -> int:
    args = parse()
    os.environ.setdefault("WANDB_MODE", "disabled")
    s = settings(args)
    on_gpu = torch.cuda.is_available() and not args.tiny
    started = time.time()
    report: dict[str, Any] = {
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "device": torch.cuda.get_device_name() if on_gpu else f"CPU ({os.cpu_count()} cores)",
        "torch": torch.__version__,
        "cuda": torch.version.cuda if on_gpu else None,
        "lightning": L.__version__,
        "python": platform.python_version(),
        "tiny": args.tiny,
        "settings": {
            "modes": s.modes,
            "batches": s.batches,
            "read_batches": s.read_batches,
            "max_warmup": s.max_warmup,
            "settle": SETTLE,
            "rounds": s.rounds,
            "compile_overrides": s.backend,
        },
        "exps": [],
    }

    def save(part: str) -> None:
        """The report so far, and a line that says how far the run got (a run cut short keeps both)."""
        report["seconds"] = round(time.time() - started, 1)
        Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
        print(f"gpu_check: {part} done at {report['seconds']} s", flush=True)

    for name in args.exps.split(","):
        report["exps"] += check_exp(name, s)
        save(name)
    checks = {
        "baselines": lambda: {"baselines": check_baselines(report["exps"], s, report["device"])},
        "bundle": lambda: check_bundle(s),
        "guard": lambda: check_guard(s),
    }
    for part in args.checks.split(","):
        report.update(attempt(part, checks[part]))
        save(part)
    print_report(report)
    print(f"written: {args.out} ({report['seconds']} s)")
    failed = failures(report)
    for failure in failed:
        print(f"FAILED: {failure}")
    return 1 if failed else 0


def print_report(report: dict[str, Any]) -> None:
    print(f"\n{report['device']}, torch {report['torch']}, lightning {report['lightning']}, {report['date']}")
    print(table(report["exps"]))
    if lines := reads_lines(report["exps"]):
        print("host reads per step outside logging steps (eager warm-up), by line:", *lines, sep="\n")
    if lines := reads_lines(report["exps"], "device_syncs"):
        print(
            "GPU waits per step outside logging steps (CUDA sync debug mode, anyone's code):",
            *lines,
            sep="\n",
        )
    if "bundle_replays_on_cpu" in report:
        print(f"bundle from the device replays on CPU: {'yes' if report['bundle_replays_on_cpu'] else 'NO'}")
    if "guard_and_monitor_over_off" in report:
        ratio = report["guard_and_monitor_over_off"]
        print(f"guard + gradient monitor on / off, seconds per batch: {ratio:.3f} (target: at most 1.03)")
    print(*baseline_lines(report.get("baselines", {})), sep="\n")


if __name__ == "__main__":
    sys.exit(main())
