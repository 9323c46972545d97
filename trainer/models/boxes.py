"""Box operations for the detector, in plain torch (torchvision's cannot load next to CPU torch here; NMS uses
torchvision's kernel where it does load).

Boxes are (x1, y1, x2, y2) in pixels, as in torchvision's detection contract.
"""

import functools
from types import ModuleType

import torch
import torch.nn.functional as F


def box_area(boxes: torch.Tensor) -> torch.Tensor:
    return (boxes[..., 2] - boxes[..., 0]).clamp(min=0) * (boxes[..., 3] - boxes[..., 1]).clamp(min=0)


def _intersection_union(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Intersection and union areas of boxes a (..., 4) and b (..., 4), broadcast against each other."""
    top_left = torch.max(a[..., :2], b[..., :2])
    bottom_right = torch.min(a[..., 2:], b[..., 2:])
    inter = (bottom_right - top_left).clamp(min=0).prod(-1)
    return inter, box_area(a) + box_area(b) - inter


def box_iou(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Pairwise intersection over union of boxes a (N, 4) and b (M, 4), (N, M)."""
    inter, union = _intersection_union(a[:, None], b[None])
    return inter / union.clamp(min=1e-9)


def generalized_box_iou(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Pairwise GIoU of boxes a (N, 4) and b (M, 4), (N, M)."""
    return paired_generalized_box_iou(a[:, None], b[None])


def paired_generalized_box_iou(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """GIoU (Rezatofighi et al., 2019) of each box in a (..., 4) with its counterpart in b (broadcast): IoU
    minus the part of the smallest enclosing box that neither box covers; in [-1, 1], and informative for
    boxes that do not overlap."""
    inter, union = _intersection_union(a, b)
    enclosing = (torch.max(a[..., 2:], b[..., 2:]) - torch.min(a[..., :2], b[..., :2])).prod(-1)
    return inter / union.clamp(min=1e-9) - (enclosing - union) / enclosing.clamp(min=1e-9)


def nms(boxes: torch.Tensor, scores: torch.Tensor, iou_threshold: float) -> torch.Tensor:
    """Indices of the boxes kept by greedy non-maximum suppression, highest score first.

    Greedy NMS keeps a box unless a higher-scoring kept box overlaps it by more than the threshold. That
    rule is triangular (each box depends only on higher-scoring ones), so iterating it from "keep all"
    fixes one more box per round and reaches the greedy answer in as many rounds as the longest chain of
    suppressions: a few whole-tensor rounds with one host read each, instead of one read per box."""
    order = scores.argsort(descending=True)
    iou = box_iou(boxes[order], boxes[order])
    overlaps = (iou > iou_threshold).triu(diagonal=1)  # [i, j]: i scores higher and covers j
    keep = torch.ones(len(order), dtype=torch.bool, device=boxes.device)
    while True:
        updated = ~(overlaps & keep[:, None]).any(0)
        if torch.equal(updated, keep):
            return order[keep]
        keep = updated


def batched_nms(
    boxes: torch.Tensor, scores: torch.Tensor, labels: torch.Tensor, iou_threshold: float
) -> torch.Tensor:
    """NMS within each label: boxes of different classes never suppress each other. torchvision's kernel
    where torchvision imports (GPU clusters), else the same rule in plain torch (boxes of each class
    shifted apart by more than any box's extent)."""
    if len(boxes) == 0:
        return torch.empty(0, dtype=torch.long, device=boxes.device)
    if (ops := _torchvision_ops()) is not None:
        return ops.batched_nms(boxes.float(), scores.float(), labels, iou_threshold)
    offsets = labels.to(boxes) * (boxes.max() + 1)
    return nms(boxes + offsets[:, None], scores, iou_threshold)


@functools.cache
def _torchvision_ops() -> ModuleType | None:
    """torchvision.ops when torchvision loads next to this torch; None on CPU machines where its wheel is
    built for another torch and fails to import (see the README's Install section)."""
    try:
        from torchvision import ops  # pyright: ignore[reportMissingImports]  # (optional)
    except Exception:  # ImportError, or RuntimeError: "operator torchvision::nms does not exist"
        return None
    return ops


def sigmoid_focal_loss(
    logits: torch.Tensor, targets: torch.Tensor, alpha: float = 0.25, gamma: float = 2.0
) -> torch.Tensor:
    """Focal loss (Lin et al., 2017), summed: binary cross-entropy scaled by (1 - p_t)^gamma, so that the
    many easy negatives of a dense detector do not drown the few positives; alpha weighs the positives."""
    p = logits.sigmoid()
    ce = F.binary_cross_entropy_with_logits(logits, targets, reduction="none")
    p_t = p * targets + (1 - p) * (1 - targets)
    alpha_t = alpha * targets + (1 - alpha) * (1 - targets)
    return (alpha_t * (1 - p_t) ** gamma * ce).sum()
