"""Extractive question answering: fine-tune a pretrained encoder to point at the answer span.

The model scores every token twice, as the answer's start and as its end; training is cross-entropy on the
gold start and end tokens (the [CLS] token for "no answer in this window"). Validation turns the scores of
all windows of a question into one answer text (trainer/metrics/squad.py) and reports SQuAD exact match
and F1, with a table of answered questions in W&B.
"""

from collections.abc import Mapping
from typing import Any, ClassVar

import lightning as L
import numpy as np
import torch
from torch import nn

from trainer.config.ranges import (
    FiniteFloat,
    Fraction,
    NonNegative,
    NonNegativeFloat,
    Positive,
    PositiveFloat,
)
from trainer.data.evaluation import gather_by_key
from trainer.data.squad import Example, ValidationSet
from trainer.lightning_internals import log_step
from trainer.metrics.squad import predict_answers, score, squad_metrics
from trainer.reporting.loggers import wandb_loggers
from trainer.tasks.base import StepReport, Task, stepwise


class ExtractiveQA(Task):
    # (the last two with unanswerable questions among the validation set: squad_metrics)
    validation_metrics: ClassVar[Mapping[str, str | None]] = {
        "val/exact": "max",
        "val/f1": "max",
        "val/f1_has_answer": "max",
        "val/f1_no_answer": "max",
    }

    def __init__(
        self,
        encoder: nn.Module,
        lr: PositiveFloat = 5e-5,
        weight_decay: NonNegativeFloat = 0.01,
        warmup_ratio: Fraction = 0.1,
        n_best: Positive = 20,
        max_answer_length: Positive = 30,
        null_threshold: FiniteFloat = 0.0,  # a difference of two logits: either sign
        table_rows: NonNegative = 20,
    ):
        super().__init__()
        self.save_hyperparameters(ignore=["encoder"])
        self.encoder = encoder
        self._val_logits: dict[int, tuple[np.ndarray, np.ndarray]] = {}  # feature -> start and end logits

    def configure_optimizers(self) -> dict[str, Any]:
        from transformers import get_linear_schedule_with_warmup

        # As BERT was trained: no weight decay on biases and LayerNorm weights. Told by name and module, not
        # by shape: under FSDP every parameter is a flat piece of a shard.
        norms = {p for m in self.modules() if isinstance(m, nn.LayerNorm) for p in m.parameters()}
        exempt = {p for n, p in self.named_parameters() if n.endswith("bias") or p in norms}
        decay = [p for p in self.parameters() if p not in exempt]
        no_decay = [p for p in self.parameters() if p in exempt]
        optimizer = torch.optim.AdamW(
            [
                {"params": decay, "weight_decay": self.hparams.weight_decay},
                {"params": no_decay, "weight_decay": 0.0},
            ],
            lr=self.hparams.lr,
            fused=self.fused_optimizer,
        )
        total = self.planned_steps()
        schedule = get_linear_schedule_with_warmup(optimizer, int(self.hparams.warmup_ratio * total), total)
        return stepwise(optimizer, schedule)

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        # The batch holds the gold start and end tokens; the model's loss is the mean of the two
        # cross-entropies.
        loss = self.encoder(**batch).loss
        self.report(StepReport(losses={"loss": loss}))
        return loss

    # -- validation: logits of every window -> one answer per question -> EM / F1 ----------------------

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        feature_index = batch.pop("feature_index")
        out = self.encoder(**batch)
        lengths = batch["attention_mask"].sum(1).tolist()  # each window's own tokens, without the padding
        start, end = (x.float().cpu().numpy() for x in (out.start_logits, out.end_logits))
        for row, (index, length) in enumerate(zip(feature_index.tolist(), lengths)):
            self._val_logits[index] = (start[row, :length], end[row, :length])

    def on_validation_epoch_end(self) -> None:
        if not self._val_logits:
            return
        logits = gather_by_key(self._val_logits)  # every window once, whatever the world size
        self._val_logits = {}
        val: ValidationSet = self.trainer.datamodule.val_set  # pyright: ignore[reportAttributeAccessIssue]  # set by Lightning
        hp = self.hparams
        predictions = predict_answers(
            val.examples,
            val.features,
            logits,
            hp.n_best,
            hp.max_answer_length,
            val.with_unanswerable,
            hp.null_threshold,
        )
        metrics = squad_metrics(predictions, val.examples)
        self.log_dict({f"val/{k}": v for k, v in metrics.items()}, sync_dist=False)  # same on every rank
        if not self.trainer.sanity_checking:
            log_answers_table(self.trainer, val.examples, predictions, hp.table_rows)


def log_answers_table(
    trainer: L.Trainer, examples: list[Example], predictions: dict[str, str], rows: int
) -> None:
    """The first `rows` answered questions (the same ones every epoch) as a W&B table."""
    loggers = wandb_loggers(trainer)
    if not loggers or not trainer.is_global_zero or rows <= 0:
        return
    data = []
    for example in [e for e in examples if e.id in predictions][:rows]:
        prediction = predictions[example.id]
        f1 = score(prediction, example.answers)[1]
        data.append(
            [
                example.id,
                example.question,
                snippet(example),
                prediction or "(no answer)",
                " | ".join(example.answers) or "(no answer)",
                round(100 * f1, 1),
            ]
        )
    for logger in loggers:
        logger.log_table(
            "val/answers",
            ["id", "question", "context", "prediction", "gold", "f1"],
            data,
            step=log_step(trainer),
        )


def snippet(example: Example, width: int = 300) -> str:
    """Up to `width` characters of the context around the first gold answer."""
    context = example.context
    if len(context) <= width:
        return context
    center = example.starts[0] + len(example.answers[0]) // 2 if example.answers else 0
    begin = int(np.clip(center - width // 2, 0, len(context) - width))
    return (
        ("..." if begin else "")
        + context[begin : begin + width]
        + ("..." if begin + width < len(context) else "")
    )
