"""COCO detection AP with pycocotools, the reference implementation (torchmetrics' mAP needs torchvision).

`coco_ap` takes the ground truth as a COCO-format dict and detections as torchvision-style predictions
(xyxy pixel boxes), and returns AP@[.5:.95], AP50, AP75 and each category's AP and AP50: COCO's 101-point
interpolated precision, up to 100 detections per image, all object sizes.
"""

import contextlib
import io
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval


@dataclass
class CocoScores:
    ap: float
    ap50: float
    ap75: float
    per_class: dict[str, float]  # category name -> AP@[.5:.95]; NaN for a category without ground truth
    per_class50: dict[str, float]  # category name -> AP50


def detections_to_coco(
    image_ids: Sequence[int], predictions: Sequence[dict[str, torch.Tensor]], label_to_category: Sequence[int]
) -> list[dict[str, Any]]:
    """torchvision-style predictions (xyxy boxes, labels 0..K-1, scores) as COCO result entries."""
    results = []
    for image_id, prediction in zip(image_ids, predictions):
        xyxy = prediction["boxes"].detach().float().cpu()  # (on CPU, the caller's own tensor: not in place)
        boxes = torch.cat([xyxy[:, :2], xyxy[:, 2:] - xyxy[:, :2]], dim=1)  # xyxy -> xywh
        for box, label, score in zip(
            boxes.tolist(), prediction["labels"].tolist(), prediction["scores"].tolist()
        ):
            results.append(
                {
                    "image_id": int(image_id),
                    "category_id": label_to_category[label],
                    "bbox": box,
                    "score": score,
                }
            )
    return results


def coco_ap(ground_truth: dict[str, Any], detections: list[dict[str, Any]]) -> CocoScores:
    """AP of COCO result entries against a COCO-format ground truth (images, annotations, categories).
    Without ground-truth boxes there is nothing to find and AP is undefined: NaN, overall as per class."""
    names = {c["id"]: c["name"] for c in ground_truth["categories"]}
    if not detections:  # pycocotools cannot load an empty result list; nothing found scores 0
        has_boxes = {a["category_id"] for a in ground_truth["annotations"]}
        per_class = {n: 0.0 if i in has_boxes else float("nan") for i, n in names.items()}
        overall = 0.0 if has_boxes else float("nan")
        return CocoScores(overall, overall, overall, per_class, dict(per_class))
    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints its progress
        gt = COCO()
        # (pycocotools' stubs say a private TypedDict for the file's content, and a file name only for the
        # results, which may be their list)
        gt.dataset = _with_defaults(ground_truth)  # pyright: ignore[reportAttributeAccessIssue]
        gt.createIndex()
        evaluation = COCOeval(gt, gt.loadRes(detections), iouType="bbox")  # pyright: ignore[reportArgumentType]
        evaluation.evaluate()
        evaluation.accumulate()
    # precision: [IoU threshold (.5:.05:.95), recall (101 points), category, area range, max detections];
    # area range 0 is "all", max detections 2 is 100. -1 marks a category without ground truth.
    precision = evaluation.eval["precision"][:, :, :, 0, 2]

    def mean(p: np.ndarray) -> float:
        valid = p[p > -1]
        return float(valid.mean()) if valid.size else float("nan")

    categories = list(enumerate(evaluation.params.catIds))
    return CocoScores(
        mean(precision),
        mean(precision[0]),
        mean(precision[5]),
        per_class={names[c]: mean(precision[:, :, k]) for k, c in categories},
        per_class50={names[c]: mean(precision[0, :, k]) for k, c in categories},
    )


def _with_defaults(ground_truth: dict[str, Any]) -> dict[str, Any]:
    """The fields COCOeval reads that a minimal COCO file may leave out (area, iscrowd), and annotation ids
    from 1: COCOeval takes id 0 for "unmatched"."""
    annotations = [
        {**a, "area": a.get("area", a["bbox"][2] * a["bbox"][3]), "iscrowd": a.get("iscrowd", 0), "id": i + 1}
        for i, a in enumerate(ground_truth["annotations"])
    ]
    return {**ground_truth, "annotations": annotations}
