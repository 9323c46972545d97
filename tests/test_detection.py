"""Detection building blocks: box operations, focal loss and COCO AP, each against values worked out by hand."""

import math

import pytest
import torch

from trainer.metrics.coco import coco_ap, detections_to_coco
from trainer.models.boxes import batched_nms, box_iou, generalized_box_iou, nms, sigmoid_focal_loss


def test_iou_and_giou_by_hand():
    a = torch.tensor([[0.0, 0.0, 10.0, 10.0]])
    b = torch.tensor([[5.0, 0.0, 15.0, 10.0],     # half overlapping: 50 / 150
                      [20.0, 0.0, 30.0, 10.0],    # disjoint, 10 apart: enclosing 300, union 200
                      [0.0, 0.0, 10.0, 10.0]])    # the same box
    assert torch.allclose(box_iou(a, b), torch.tensor([[1 / 3, 0.0, 1.0]]))
    assert torch.allclose(generalized_box_iou(a, b), torch.tensor([[1 / 3, -1 / 3, 1.0]]))


def test_nms_keeps_the_best_of_each_overlapping_group_per_class():
    boxes = torch.tensor([[0.0, 0, 10, 10], [1, 0, 11, 10], [20, 20, 30, 30], [0, 0, 10, 10]])
    scores = torch.tensor([0.9, 0.8, 0.7, 0.95])
    assert nms(boxes, scores, 0.5).tolist() == [3, 2]  # 0 and 1 overlap 3 by IoU 1 and 9/11
    labels = torch.tensor([0, 1, 0, 0])
    assert sorted(batched_nms(boxes, scores, labels, 0.5).tolist()) == [1, 2, 3]  # 1 is another class
    assert batched_nms(boxes[:0], scores[:0], labels[:0], 0.5).numel() == 0


def test_focal_loss_by_hand():
    logits, targets = torch.tensor([0.0, 2.0]), torch.tensor([1.0, 0.0])
    # p = 0.5 for a positive: 0.25 * 0.5^2 * ln 2; p = sigmoid(2) for a negative: 0.75 * p^2 * -ln(1 - p)
    p = 1 / (1 + math.exp(-2))
    expected = 0.25 * 0.25 * math.log(2) + 0.75 * p**2 * -math.log(1 - p)
    assert sigmoid_focal_loss(logits, targets).item() == pytest.approx(expected, rel=1e-6)


def ground_truth(*boxes_per_image: list[tuple[int, list[float]]]) -> dict:
    """COCO ground truth: per image a list of (category id, xywh box)."""
    return {"images": [{"id": i + 1, "width": 100, "height": 100} for i in range(len(boxes_per_image))],
            "annotations": [{"image_id": i + 1, "category_id": c, "bbox": box}
                            for i, boxes in enumerate(boxes_per_image) for c, box in boxes],
            "categories": [{"id": 1, "name": "one"}, {"id": 2, "name": "two"}]}


def detection(image_id: int, category_id: int, bbox: list[float], score: float) -> dict:
    return {"image_id": image_id, "category_id": category_id, "bbox": bbox, "score": score}


def test_coco_ap_matches_hand_made_cases():
    gt = ground_truth([(1, [10, 10, 20, 20])], [(2, [50, 50, 10, 10])])
    perfect = coco_ap(gt, [detection(1, 1, [10, 10, 20, 20], 1.0), detection(2, 2, [50, 50, 10, 10], 1.0)])
    assert perfect.ap == pytest.approx(1.0) and perfect.ap50 == pytest.approx(1.0)
    assert perfect.per_class == pytest.approx({"one": 1.0, "two": 1.0})

    # IoU 0.62 passes the thresholds .50, .55 and .60 of the ten: AP@[.5:.95] = 3/10.
    loose = coco_ap(ground_truth([(1, [0, 0, 10, 10])]), [detection(1, 1, [0, 0, 10, 6.2], 0.9)])
    assert (loose.ap50, loose.ap75, loose.ap) == pytest.approx((1.0, 0.0, 0.3))

    # A false positive ranked above the one true positive: precision 1/2 at every recall level.
    ranked = coco_ap(ground_truth([(1, [0, 0, 10, 10])]),
                     [detection(1, 1, [50, 50, 10, 10], 0.9), detection(1, 1, [0, 0, 10, 10], 0.8)])
    assert ranked.ap50 == pytest.approx(0.5)

    # One of two objects found: precision 1 up to recall 0.5, i.e. 51 of COCO's 101 recall points.
    half = coco_ap(ground_truth([(1, [0, 0, 10, 10]), (1, [50, 50, 10, 10])]), [detection(1, 1, [0, 0, 10, 10], 0.9)])
    assert half.ap50 == pytest.approx(51 / 101)

    # Per class: "one" found, "two" missed; a class without ground truth is NaN, not 0.
    split = coco_ap(gt, [detection(1, 1, [10, 10, 20, 20], 0.9)])
    assert split.per_class == pytest.approx({"one": 1.0, "two": 0.0}) and split.ap == pytest.approx(0.5)
    absent = coco_ap(ground_truth([(1, [0, 0, 10, 10])]), [detection(1, 1, [0, 0, 10, 10], 0.9)])
    assert absent.per_class["one"] == pytest.approx(1.0) and math.isnan(absent.per_class["two"])
    assert coco_ap(gt, []).ap50 == 0.0


def test_predictions_convert_from_xyxy_labels_to_coco_entries():
    predictions = [{"boxes": torch.tensor([[10.0, 20.0, 30.0, 60.0]]), "labels": torch.tensor([1]),
                    "scores": torch.tensor([0.5])}]
    assert detections_to_coco([7], predictions, label_to_category=[3, 9]) == [
        {"image_id": 7, "category_id": 9, "bbox": [10.0, 20.0, 20.0, 40.0], "score": 0.5}]
