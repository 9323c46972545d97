"""Object detection: a detector that follows torchvision's contract (trainer/models/detector.py, or a
torchvision model by `_target_`), trained on the sum of its losses and validated by COCO AP.

Validation collects every image's detections, and at the end of the epoch scores them against the
validation file's boxes with pycocotools (trainer/metrics/coco.py): val/AP (AP@[.5:.95]), val/AP50, val/AP75.
"""

from collections.abc import Mapping
from typing import Any, ClassVar

import lightning as L
import torch
from torch import nn

from trainer.config.ranges import Fraction, NonNegative, NonNegativeFloat, PositiveFloat
from trainer.data.coco import CocoDetection, Target
from trainer.data.evaluation import gather_by_key
from trainer.errors import UserError
from trainer.lightning_internals import log_step
from trainer.metrics.coco import CocoScores, coco_ap, detections_to_coco
from trainer.reporting.loggers import wandb_loggers
from trainer.tasks.base import StepReport, Task, stepwise

Batch = tuple[list[torch.Tensor], list[Target]]


class Detection(Task):
    validation_metrics: ClassVar[Mapping[str, str | None]] = {
        "val/AP": "max",
        "val/AP50": "max",
        "val/AP75": "max",
    }

    def __init__(
        self,
        detector: nn.Module,
        lr: PositiveFloat = 2e-3,
        weight_decay: NonNegativeFloat = 1e-4,
        warmup_ratio: Fraction = 0.05,
        overlay_images: NonNegative = 8,
    ):
        super().__init__()
        self.save_hyperparameters(ignore=["detector"])
        self.detector = detector
        self._detections: dict[int, list[dict[str, Any]]] = {}  # image id -> its COCO result entries
        self._overlays: list[tuple[torch.Tensor, Target, dict[str, torch.Tensor]]] = []  # for W&B

    def setup(self, stage: str) -> None:
        val_set = self._val_set_if_any()
        if val_set is None:  # a divergence replay brings its one batch, no data module
            return
        classes = len(val_set.category_ids)
        expected = getattr(self.detector, "num_classes", classes)
        if expected != classes:
            raise UserError(
                f"model.detector.num_classes={expected}, but the data has {classes} categories: "
                f"set model.detector.num_classes={classes}"
            )

    def _val_set_if_any(self) -> CocoDetection | None:
        """The validation set of the trainer's data module (a CocoDataModule, or one like it); None without
        one."""
        datamodule = self.trainer.datamodule  # pyright: ignore[reportAttributeAccessIssue]  # set by Lightning
        return datamodule.val_set if datamodule is not None else None

    def _val_set(self) -> CocoDetection:
        """The validation set, in a validation (which has one)."""
        val_set = self._val_set_if_any()
        assert val_set is not None
        return val_set

    def configure_optimizers(self) -> dict[str, Any]:
        hp = self.hparams
        optimizer = torch.optim.AdamW(
            self.parameters(), lr=hp.lr, weight_decay=hp.weight_decay, fused=self.fused_optimizer
        )
        total = self.planned_steps()
        schedule = torch.optim.lr_scheduler.OneCycleLR(
            optimizer, hp.lr, total_steps=total, pct_start=hp.warmup_ratio
        )
        return stepwise(optimizer, schedule)

    def training_step(self, batch: Batch, batch_idx: int) -> torch.Tensor:
        images, targets = batch
        losses = self.detector(images, targets)
        loss = sum(losses.values())
        assert isinstance(loss, torch.Tensor)  # (sum() starts from 0)
        # The guard watches each part (trainer/tasks/base.py); the total goes to the loggers too.
        self.report(StepReport(losses=losses, signals={"loss": loss}))
        return loss

    def validation_step(self, batch: Batch, batch_idx: int) -> None:
        images, targets = batch
        ids = torch.stack([t["image_id"] for t in targets]).tolist()  # one read, not one per image
        predictions = self.detector(images)
        category_ids = self._val_set().category_ids
        for image_id, prediction in zip(ids, predictions):
            self._detections[image_id] = detections_to_coco([image_id], [prediction], category_ids)
        room = self.hparams.overlay_images - len(self._overlays)
        self._overlays += [(i.cpu(), t, p) for i, t, p in zip(images[:room], targets, predictions)]

    def on_validation_epoch_end(self) -> None:
        if not self._detections:
            return
        # each rank saw its share: score every image once, everywhere
        by_image = gather_by_key(self._detections)
        self._detections = {}
        scores = coco_ap(
            self.ground_truth(set(by_image)), [d for entries in by_image.values() for d in entries]
        )
        self.log_dict(
            {"val/AP": scores.ap, "val/AP50": scores.ap50, "val/AP75": scores.ap75}, sync_dist=False
        )
        overlays, self._overlays = self._overlays, []
        if self.trainer.is_global_zero and not self.trainer.sanity_checking:
            log_to_wandb(self.trainer, overlays, scores, self._val_set().class_names)

    def ground_truth(self, image_ids: set[int]) -> dict[str, Any]:
        """The validation file restricted to the images evaluated (all of them, unless limit_val_batches)."""
        coco = self._val_set().coco
        return {
            "images": [i for i in coco["images"] if i["id"] in image_ids],
            "annotations": [a for a in coco["annotations"] if a["image_id"] in image_ids],
            "categories": coco["categories"],
        }


def log_to_wandb(
    trainer: L.Trainer,
    overlays: list[tuple[torch.Tensor, Target, dict[str, torch.Tensor]]],
    scores: CocoScores,
    class_names: list[str],
) -> None:
    """Validation images with predicted and true boxes as W&B box overlays, and a table of per-class AP."""
    loggers = wandb_loggers(trainer)
    if not loggers:
        return
    import wandb

    classes = dict(enumerate(class_names))

    def boxes(
        boxes: torch.Tensor, labels: torch.Tensor, scores: torch.Tensor | None = None
    ) -> dict[str, Any]:
        data = []
        for k, ((x1, y1, x2, y2), label) in enumerate(zip(boxes.tolist(), labels.tolist())):
            entry = {
                "position": {"minX": x1, "minY": y1, "maxX": x2, "maxY": y2},
                "domain": "pixel",
                "class_id": label,
                "box_caption": classes[label],
            }
            if scores is not None:
                entry["scores"] = {"score": float(scores[k])}
                entry["box_caption"] += f" {float(scores[k]):.2f}"
            data.append(entry)
        return {"box_data": data, "class_labels": classes}

    images = [
        wandb.Image(
            image.permute(1, 2, 0).numpy(),
            boxes={
                "predictions": boxes(p["boxes"], p["labels"], p["scores"]),
                "ground_truth": boxes(t["boxes"], t["labels"]),
            },
        )
        for image, t, p in overlays
    ]
    table = wandb.Table(
        columns=["class", "AP", "AP50"],
        data=[[name, scores.per_class[name], scores.per_class50[name]] for name in class_names],
    )
    for logger in loggers:
        # (W&B's logger takes media; Lightning declares numbers)
        logger.log_metrics({"val/boxes": images, "val/per_class_AP": table}, step=log_step(trainer))  # pyright: ignore[reportArgumentType]
