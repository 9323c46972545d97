"""The GPU path on CPU: `trainer=gpu` with only the device changed trains every exp (bf16 autocast, fused
optimizers, channels_last, torch.compile with the CPU-friendly aot_eager backend), and compiles in its first
epoch only; the compile settings are checked before a run; the detector's losses read no value on the host."""

import json
import math
from collections.abc import Iterator
from functools import partial
from pathlib import Path

import lightning as L
import pytest
import torch
import torch.nn.functional as F
import torch.utils._pytree as pytree
from helpers import TINY_DCGAN, assert_clean_failure, compose_config, run_cli
from torch.utils._python_dispatch import TorchDispatchMode

from trainer.config.check import check_config
from trainer.data.squad import PadBatch, SquadDataModule
from trainer.errors import UserError
from trainer.models.boxes import generalized_box_iou, sigmoid_focal_loss
from trainer.models.detector import FCOSLite, centerness_target
from trainer.perf.profiling import compiled_graphs
from trainer.run import train

QUIET = ["logger=none", "++trainer.enable_progress_bar=false", "++trainer.enable_model_summary=false"]
# What a CPU machine changes in trainer=gpu: the device, and (no GPU to copy to) unpinned batches.
GPU_ON_CPU = [
    "trainer=gpu",
    "trainer.accelerator=cpu",
    "data.pin_memory=false",
    "perf.compile=true",
    "perf.compile_backend=aot_eager",
]
# Each exp, tiny, for two epochs (QA: with several window lengths; PPO and DQN: two evaluations).
TINY = {
    "dcgan": [*TINY_DCGAN, "++trainer.max_epochs=2"],
    "detector": [
        "+exp=detector",
        "data.canvases.train_images=32",
        "data.canvases.val_images=6",
        "data.batch_size=8",
        "model.detector.width=8",
        "++trainer.max_epochs=2",
        "++trainer.limit_train_batches=3",
    ],
    "ppo": [
        "+exp=ppo",
        "task.num_envs=2",
        "task.num_steps=32",
        "task.total_env_steps=256",
        "task.env_steps_per_epoch=128",
        "task.eval_episodes=2",
    ],
    "dqn": [
        "+exp=dqn",
        "task.total_env_steps=1000",
        "task.learning_starts=200",
        "task.updates_per_step=10",
        "task.env_steps_per_epoch=500",
        "task.eval_episodes=2",
    ],
    "qa": [
        "+exp=qa",
        "data.max_length=128",
        "data.doc_stride=32",
        "data.batch_size=2",
        "data.eval_batch_size=4",
        "++trainer.max_epochs=2",
        "++trainer.val_check_interval=1.0",
    ],
}


@pytest.fixture(scope="module")
def tiny_bert(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A one-layer BERT with random weights and MiniLM's tokenizer: the QA path at a fraction of the cost."""
    from transformers import BertConfig, BertForQuestionAnswering

    from trainer.models.qa import load_tokenizer

    folder = tmp_path_factory.mktemp("tiny-bert")
    tokenizer = load_tokenizer("minilm")
    config = BertConfig(
        vocab_size=tokenizer.vocab_size,
        hidden_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=64,
    )
    BertForQuestionAnswering(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def varied_squad(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """SQuAD files whose contexts run from 4 to 103 words: unpadded, nearly every batch has a new length."""
    folder = tmp_path_factory.mktemp("squad")
    words = ["river", "stone", "cloud", "apple", "tower", "garden", "bridge", "winter", "market", "candle"]
    for split, count in (("train", 24), ("val", 8)):
        paragraphs = []
        for i in range(count):
            context = " ".join(words[(i + k) % len(words)] for k in range(4 + 37 * i % 100))
            qa = {
                "id": f"{split}{i}",
                "question": "Which word comes first?",
                "answers": [{"text": context.split()[0], "answer_start": 0}],
            }
            paragraphs.append({"context": context, "qas": [qa]})
        (folder / f"{split}.json").write_text(json.dumps({"data": [{"paragraphs": paragraphs}]}))
    return folder


@pytest.fixture
def fresh_dynamo() -> Iterator[None]:
    """Compiled code and the float32 matmul setting (trainer=gpu: high) are process-wide: each test starts
    and leaves them as it found them. A frame compiled past dynamo's recompile limit fails the test instead
    of falling back to eager, where it would stop adding graphs."""
    precision = torch.get_float32_matmul_precision()
    torch._dynamo.reset()
    with torch._dynamo.config.patch(fail_on_recompile_limit_hit=True):
        yield
    torch._dynamo.reset()
    torch.set_float32_matmul_precision(precision)


class Watch(L.Callback):
    """Graphs compiled so far at the start of each training epoch and at the end; the trainer's precision and
    optimizers, the model's convolution weights."""

    def __init__(self) -> None:
        self.graphs: list[int] = []
        self.optimizers: list[torch.optim.Optimizer] = []
        self.convolutions: list[torch.Tensor] = []
        self.precision = ""

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.graphs.append(compiled_graphs())

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.graphs.append(compiled_graphs())
        self.optimizers, self.precision = list(trainer.optimizers), trainer.precision
        self.convolutions = [p for p in pl_module.parameters() if p.dim() == 4]


@pytest.mark.parametrize("exp", list(TINY))
def test_the_gpu_preset_trains_every_exp_on_cpu_and_compiles_only_in_the_first_epoch(
    exp: str, tmp_path: Path, request: pytest.FixtureRequest, fresh_dynamo: None
) -> None:
    """`+exp=qa trainer=gpu` once crashed at its first step (a fused optimizer clipped under bf16): every exp
    runs the preset here, PPO and QA with their gradient clipping."""
    overrides = [*TINY[exp], *GPU_ON_CPU, *QUIET]
    if exp == "qa":
        overrides += [f"model.encoder.pretrained={request.getfixturevalue('tiny_bert')}"]
        squad = request.getfixturevalue("varied_squad")
        overrides += [f"data.train_file={squad / 'train.json'}", f"data.val_file={squad / 'val.json'}"]
    cfg = compose_config(*overrides, run_dir=tmp_path)
    check_config(cfg)
    watch = Watch()

    def prepare(trainer: L.Trainer) -> L.Trainer:
        trainer.callbacks.append(watch)
        return trainer

    metrics = train(cfg, prepare=prepare)
    checkpoint = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=True)
    assert checkpoint["global_step"] > 0 and checkpoint["epoch"] == 1
    assert metrics and all(math.isfinite(m["final"]) for m in metrics.values()), metrics
    assert watch.optimizers and all(o.defaults["fused"] for o in watch.optimizers)
    assert watch.precision == "bf16-mixed"
    assert all(p.is_contiguous(memory_format=torch.channels_last) for p in watch.convolutions)
    assert bool(watch.convolutions) == (exp in ("dcgan", "detector"))
    if exp == "qa":
        assert cfg.trainer.gradient_clip_val == 1.0
    # Compiled in the first epoch (its validation included), never after; the names stay the model's.
    first, second, end = watch.graphs[0], watch.graphs[1], watch.graphs[-1]
    assert second > first and end == second, watch.graphs
    assert not any("_orig_mod" in name for name in checkpoint["state_dict"])


@pytest.mark.parametrize(
    "overrides,message",
    [
        (
            ["perf.compile_backend=inductr"],
            r"perf\.compile_backend=inductr is not a torch\.compile backend here: did you mean inductor\?",
        ),
        (
            ["perf.compile_backend=aot_eager", "perf.compile_mode=max-autotune"],
            r"perf\.compile_mode=max-autotune is a mode of the inductor backend, not of aot_eager",
        ),
        (
            ["perf.compile_mode=fastest"],
            r"perf\.compile_mode='fastest' has the wrong type: expected one of 'default'",
        ),
        (["perf.compile=yes"], r"perf\.compile='yes' has the wrong type: expected bool"),
        (["perf.matmul_precision=low"], r"perf\.matmul_precision='low' has the wrong type: expected one of"),
    ],
)
def test_compile_settings_are_checked_before_the_run(
    overrides: list[str], message: str, tmp_path: Path
) -> None:
    cfg = compose_config("+exp=dcgan", "perf.compile=true", *overrides, run_dir=tmp_path)
    with pytest.raises(UserError, match=message):
        check_config(cfg)


def test_a_bad_compile_backend_ends_the_cli_in_one_line(tmp_path: Path, home: Path) -> None:
    done = run_cli(
        "+exp=dcgan", "perf.compile=true", "perf.compile_backend=tvmm", f"hydra.run.dir={tmp_path}", home=home
    )
    assert done.returncode == 2
    assert_clean_failure(
        done, "perf.compile_backend=tvmm is not a torch.compile backend here: did you mean tvm?"
    )
    assert not (tmp_path / "checkpoints").exists()


def test_squad_batches_pad_to_a_multiple_of_8_or_of_max_length() -> None:
    items = [{"input_ids": [5] * n, "attention_mask": [1] * n, "start_positions": 0} for n in (3, 17, 9)]
    eager, static = PadBatch(pad_token_id=0, multiple=8)(items), PadBatch(pad_token_id=0, multiple=64)(items)
    assert eager["input_ids"].shape == eager["attention_mask"].shape == (3, 24)
    assert static["input_ids"].shape == (3, 64)
    for batch in (eager, static):
        assert batch["attention_mask"].sum(1).tolist() == [3, 17, 9]
        assert torch.equal(batch["input_ids"], batch["attention_mask"] * 5)


@pytest.mark.parametrize("static_shapes", [False, True])
def test_qa_pads_to_max_length_only_when_compiled(static_shapes: bool, varied_squad: Path) -> None:
    data = SquadDataModule(
        tokenizer="minilm",
        train_file=str(varied_squad / "train.json"),
        val_file=str(varied_squad / "val.json"),
        max_length=128,
        doc_stride=32,
        batch_size=2,
        eval_batch_size=4,
        static_shapes=static_shapes,
    )
    data.setup("fit")
    lengths = {b["input_ids"].shape[1] for b in [*data.train_dataloader(), *data.val_dataloader()]}
    assert lengths == {128} if static_shapes else (len(lengths) > 5 and all(n % 8 == 0 for n in lengths))


def per_image_losses(
    model: FCOSLite,
    logits: torch.Tensor,
    boxes: torch.Tensor,
    centerness: torch.Tensor,
    points: torch.Tensor,
    targets: list[dict[str, torch.Tensor]],
) -> dict[str, torch.Tensor]:
    """FCOSLite's losses as they were computed before: image by image, the positive locations selected by
    boolean masks (whose sizes the host waits for)."""
    classes, pairs = [], []
    for i, target in enumerate(targets):
        gt = target["boxes"]
        owner = torch.full((len(points),), -1)
        if len(gt):
            x, y = points[:, None, 0], points[:, None, 1]
            inside = (x > gt[:, 0]) & (x < gt[:, 2]) & (y > gt[:, 1]) & (y < gt[:, 3])
            radius = model.center_radius * model.stride
            near = ((x - (gt[:, 0] + gt[:, 2]) / 2).abs() < radius) & (
                (y - (gt[:, 1] + gt[:, 3]) / 2).abs() < radius
            )
            area = ((gt[:, 2] - gt[:, 0]) * (gt[:, 3] - gt[:, 1]))[None].expand(len(points), -1)
            smallest, index = torch.where(inside & near, area, torch.inf).min(1)
            owner = torch.where(smallest.isfinite(), index, -1)
        positive = owner >= 0
        one_hot = torch.zeros_like(logits[i])
        one_hot[positive, target["labels"][owner[positive]]] = 1.0
        classes.append(one_hot)
        gt = gt[owner[positive]]
        pairs.append(
            (boxes[i][positive], gt, centerness[i][positive], centerness_target(points[positive], gt))
        )
    predicted, gt, predicted_centerness, target_centerness = (torch.cat(parts) for parts in zip(*pairs))
    num_positive = max(1.0, float(len(gt)))
    giou = generalized_box_iou(predicted, gt).diagonal()
    return {
        "loss_classifier": sigmoid_focal_loss(logits, torch.stack(classes)) / num_positive,
        "loss_box": ((1 - giou) * target_centerness).sum() / target_centerness.sum().clamp(min=1e-6),
        "loss_centerness": F.binary_cross_entropy_with_logits(
            predicted_centerness, target_centerness, reduction="sum"
        )
        / num_positive,
    }


def random_targets(generator: torch.Generator, counts: list[int]) -> list[dict[str, torch.Tensor]]:
    """Boxes of 6 to 40 pixels on a 96 x 96 canvas; the first two of an image overlap (the smaller wins)."""
    targets = []
    for count in counts:
        corner = torch.rand(count, 2, generator=generator) * 60
        boxes = torch.cat([corner, corner + 6 + torch.rand(count, 2, generator=generator) * 34], 1)
        if count >= 2:
            boxes[1] = boxes[0] + torch.tensor([2.0, 2.0, -2.0, -2.0])
        targets.append({"boxes": boxes, "labels": torch.randint(10, (count,), generator=generator)})
    return targets


def dense_leaves(model: FCOSLite, images: list[torch.Tensor]) -> list[torch.Tensor]:
    """The dense network's outputs as leaves: logits, boxes and centerness that take gradients, and points."""
    logits, boxes, centerness, points = model.dense(model.pad(images))
    return [*(t.detach().requires_grad_() for t in (logits, boxes, centerness)), points]


@pytest.mark.parametrize("seed", range(4))
def test_detector_losses_over_all_locations_equal_the_per_image_ones(seed: int) -> None:
    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = FCOSLite(num_classes=10, width=8)
    images = [torch.rand(3, 96, 96, generator=generator) for _ in range(4)]
    counts = [[0, 1, 3, 7], [2, 0, 0, 5], [0, 0, 0, 0], [1, 1, 4, 2]][seed]
    targets = random_targets(generator, counts)
    outputs = dense_leaves(model, images)
    masked = model.losses(*outputs, targets)
    reference = per_image_losses(model, *outputs, targets)
    for name in reference:
        assert masked[name].item() == pytest.approx(reference[name].item(), rel=1e-5, abs=1e-7), name
    gradients = torch.autograd.grad(sum(masked.values()), outputs[:3])
    expected = torch.autograd.grad(sum(reference.values()), outputs[:3])
    for got, want in zip(gradients, expected):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-7)


INDEXING = (torch.ops.aten.index.Tensor, torch.ops.aten.index_put_.default, torch.ops.aten.index_put.default)


class HostWaits(TorchDispatchMode):
    """The operators run (forward and backward) that would make the host wait for a GPU: reads of a value
    (`.item()`, `float(t)`), and results whose size depends on values (`nonzero`, boolean-mask indexing)."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        indices = [t for t in pytree.tree_leaves(args[1:]) if isinstance(t, torch.Tensor)]
        masked = func in INDEXING and any(t.dtype == torch.bool for t in indices)
        sized_by_values = torch.Tag.dynamic_output_shape in func.tags and func not in INDEXING
        if masked or sized_by_values or torch.Tag.data_dependent_output in func.tags:
            self.ops.append(str(func))
        return func(*args, **(kwargs or {}))


def test_detector_losses_make_the_host_wait_nowhere() -> None:
    generator = torch.Generator().manual_seed(0)
    model = FCOSLite(num_classes=10, width=8)
    outputs = dense_leaves(model, [torch.rand(3, 96, 96, generator=generator) for _ in range(2)])
    targets = random_targets(generator, [3, 0])
    waits = {}
    for name, losses in (("masked", model.losses), ("per image", partial(per_image_losses, model))):
        with HostWaits() as found:
            sum(losses(*outputs, targets).values()).backward()
        waits[name] = found.ops
    assert waits["masked"] == [] and "aten.index.Tensor" in waits["per image"], waits
