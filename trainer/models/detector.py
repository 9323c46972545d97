"""An anchor-free detector in the style of FCOS (Tian et al., 2019), on one feature map of stride 8.

Every feature-map location near the centre of an object predicts its class, the distances from the
location to the box's four sides, and a centerness that down-weights off-centre predictions. It follows
torchvision's detection contract, so torchvision's models drop in by `_target_` where torchvision works:
`model(images, targets)` in training returns a dict of losses, `model(images)` in evaluation a list of
{"boxes" (xyxy pixels), "labels", "scores"} per image. Images are lists of 3 x H x W tensors in [0, 1].
"""

import math
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.rnn import pad_sequence

from trainer.config.ranges import Fraction, Positive, PositiveFloat
from trainer.models.boxes import batched_nms, paired_generalized_box_iou, sigmoid_focal_loss

Target = dict[str, torch.Tensor]


def conv_bn_relu(c_in: int, c_out: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True)
    )


class FCOSLite(nn.Module):
    stride = 8

    def __init__(
        self,
        num_classes: Positive,
        width: Positive = 32,
        center_radius: PositiveFloat = 1.5,  # in strides
        score_threshold: Fraction = 0.05,
        nms_threshold: Fraction = 0.5,  # an IoU
        max_detections: Positive = 100,
    ):
        super().__init__()
        self.num_classes, self.center_radius = num_classes, center_radius
        self.score_threshold, self.nms_threshold, self.max_detections = (
            score_threshold,
            nms_threshold,
            max_detections,
        )
        w = width
        self.backbone = nn.Sequential(
            conv_bn_relu(3, w, 2),
            conv_bn_relu(w, w),
            conv_bn_relu(w, 2 * w, 2),
            conv_bn_relu(2 * w, 2 * w),
            conv_bn_relu(2 * w, 4 * w, 2),
            conv_bn_relu(4 * w, 4 * w),
        )
        self.tower = nn.Sequential(conv_bn_relu(4 * w, 4 * w), conv_bn_relu(4 * w, 4 * w))
        self.classes = nn.Conv2d(4 * w, num_classes, 3, padding=1)
        self.sides = nn.Conv2d(4 * w, 4, 3, padding=1)
        self.centerness = nn.Conv2d(4 * w, 1, 3, padding=1)
        assert self.classes.bias is not None
        # start at p = 0.01: focal loss is stable from step 1
        nn.init.constant_(self.classes.bias, -math.log(99))

    def forward(self, images: list[torch.Tensor], targets: list[Target] | None = None) -> dict | list[dict]:
        logits, boxes, centerness, points = self.dense(self.pad(images))
        if targets is not None:
            return self.losses(logits, boxes, centerness, points, targets)
        return [
            self.detect(logits[i], boxes[i], centerness[i], image.shape[-2:])
            for i, image in enumerate(images)
        ]

    def dense(self, batch: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """The network at every location: class logits (N, HW, K), boxes (N, HW, 4), centerness logits
        (N, HW), and the locations' pixel coordinates (HW, 2: x, y)."""
        features = self.tower(self.backbone((batch - 0.5) / 0.25))
        h, w = features.shape[-2:]
        logits = self.classes(features).flatten(2).transpose(1, 2)  # N, HW, K
        sides = F.softplus(self.sides(features)).flatten(2).transpose(1, 2) * self.stride  # N, HW, 4: l t r b
        centerness = self.centerness(features).flatten(2).squeeze(1)  # N, HW
        ys, xs = torch.meshgrid(
            torch.arange(h, device=batch.device), torch.arange(w, device=batch.device), indexing="ij"
        )
        points = (torch.stack([xs, ys], -1).flatten(0, 1).float() + 0.5) * self.stride  # HW, 2 (x, y)
        boxes = torch.cat([points - sides[..., :2], points + sides[..., 2:]], -1)  # N, HW, 4
        return logits, boxes, centerness, points

    def compile(self, *args: Any, **kwargs: Any) -> None:
        """torch.compile the dense network only, in place: its shapes follow the batch of images alone.
        Target assignment and the losses follow the number of objects in each image, and detection the number
        of candidate boxes: compiled, they would recompile at almost every batch."""
        self.dense = torch.compile(self.dense, *args, **kwargs)

    def pad(self, images: list[torch.Tensor]) -> torch.Tensor:
        """One batch tensor, zero-padded at the bottom and right to a common size divisible by the stride."""
        h = math.ceil(max(i.shape[-2] for i in images) / self.stride) * self.stride
        w = math.ceil(max(i.shape[-1] for i in images) / self.stride) * self.stride
        return torch.stack([F.pad(i, (0, w - i.shape[-1], 0, h - i.shape[-2])) for i in images])

    def assign(self, points: torch.Tensor, gt: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """For each image and point (N, HW), the index of the object it predicts among the image's `gt` boxes
        (N, M, 4; labels -1: padding), -1 for background: points inside a box and within center_radius
        strides of its centre; where boxes overlap, the smallest one."""
        x, y = points[:, None, 0], points[:, None, 1]  # HW, 1
        gt = gt[:, None]  # N, 1, M, 4
        inside = (x > gt[..., 0]) & (x < gt[..., 2]) & (y > gt[..., 1]) & (y < gt[..., 3])
        radius = self.center_radius * self.stride
        near = ((x - (gt[..., 0] + gt[..., 2]) / 2).abs() < radius) & (
            (y - (gt[..., 1] + gt[..., 3]) / 2).abs() < radius
        )
        area = (gt[..., 2] - gt[..., 0]) * (gt[..., 3] - gt[..., 1])
        area = torch.where(inside & near & (labels[:, None] >= 0), area, torch.inf)  # N, HW, M
        smallest, index = area.min(2)
        return torch.where(smallest.isfinite(), index, -1)

    def losses(
        self,
        logits: torch.Tensor,
        boxes: torch.Tensor,
        centerness: torch.Tensor,
        points: torch.Tensor,
        targets: list[Target],
    ) -> dict[str, torch.Tensor]:
        """Focal loss on every location's classes; GIoU and centerness on the locations assigned an object.
        Computed at every location with the others weighted 0, never selected: a selection's size is a
        value the host would wait for the GPU to know."""
        gt, labels = pad_targets(targets)
        owner = self.assign(points, gt, labels)  # N, HW
        positive = owner >= 0
        index = owner.clamp(min=0)  # background reads object 0 (or padding), weighted 0
        gt = gt.gather(1, index[..., None].expand(-1, -1, 4))  # N, HW, 4: each location's object
        labels = labels.gather(1, index)
        kinds = torch.arange(self.num_classes, device=labels.device)
        classes = positive[..., None] & (labels[..., None] == kinds)  # N, HW, K: one-hot where positive
        num_positive = positive.sum().clamp(min=1)
        target_centerness = torch.where(positive, centerness_target(points, gt), 0.0)
        giou = paired_generalized_box_iou(boxes, gt)
        return {
            "loss_classifier": sigmoid_focal_loss(logits, classes.to(logits.dtype)) / num_positive,
            "loss_box": ((1 - giou) * target_centerness).sum() / target_centerness.sum().clamp(min=1e-6),
            "loss_centerness": F.binary_cross_entropy_with_logits(
                centerness, target_centerness, weight=positive.to(target_centerness.dtype), reduction="sum"
            )
            / num_positive,
        }

    def detect(
        self, logits: torch.Tensor, boxes: torch.Tensor, centerness: torch.Tensor, size: Sequence[int]
    ) -> dict[str, torch.Tensor]:
        """Boxes scored sqrt(class probability x centerness) above the threshold, clipped to the image,
        class-wise NMS, the best max_detections."""
        scores = (logits.sigmoid() * centerness.sigmoid()[:, None]).sqrt()
        location, label = (scores > self.score_threshold).nonzero(as_tuple=True)
        scores = scores[location, label]
        top = scores.topk(min(len(scores), 1000)).indices
        location, label, scores = location[top], label[top], scores[top]
        boxes = boxes[location]
        boxes[:, 0::2] = boxes[:, 0::2].clamp(0, size[1])
        boxes[:, 1::2] = boxes[:, 1::2].clamp(0, size[0])
        keep = batched_nms(boxes, scores, label, self.nms_threshold)[: self.max_detections]
        return {"boxes": boxes[keep], "labels": label[keep], "scores": scores[keep]}


def pad_targets(targets: list[Target]) -> tuple[torch.Tensor, torch.Tensor]:
    """The images' boxes (N, M, 4) and labels (N, M) as two tensors, padded to the most objects in an image
    (at least one) with label -1."""
    boxes = pad_sequence([t["boxes"] for t in targets], batch_first=True)
    labels = pad_sequence([t["labels"] for t in targets], batch_first=True, padding_value=-1)
    if boxes.shape[1] == 0:  # no object in the whole batch
        boxes, labels = F.pad(boxes, (0, 0, 0, 1)), F.pad(labels, (0, 1), value=-1)
    return boxes, labels


def centerness_target(points: torch.Tensor, gt: torch.Tensor) -> torch.Tensor:
    """sqrt(min(l, r) / max(l, r) * min(t, b) / max(t, b)): 1 at a box's centre, towards 0 at its edges.
    Points (..., 2) and boxes (..., 4) broadcast."""
    left, top = points[..., 0] - gt[..., 0], points[..., 1] - gt[..., 1]
    right, bottom = gt[..., 2] - points[..., 0], gt[..., 3] - points[..., 1]
    horizontal = torch.min(left, right) / torch.max(left, right)
    vertical = torch.min(top, bottom) / torch.max(top, bottom)
    return (horizontal * vertical).clamp(min=0).sqrt()
