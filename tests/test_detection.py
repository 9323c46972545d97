"""Detection building blocks: box operations, focal loss and COCO AP, each against values worked out by
hand; then the detector end to end."""

import json
import math
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import assert_clean_failure, compose_config, last_step, run_cli
from hydra.utils import instantiate
from omegaconf import OmegaConf
from PIL import Image
from wandb_offline import find_runs, read_run

from trainer.data.coco import CocoDetection, collate
from trainer.data.digit_canvases import INK, write_digit_canvases
from trainer.divergence.replay import replay
from trainer.errors import UserError
from trainer.metrics.coco import coco_ap, detections_to_coco
from trainer.models.boxes import batched_nms, box_iou, generalized_box_iou, nms, sigmoid_focal_loss
from trainer.models.detector import FCOSLite
from trainer.run import train


def test_iou_and_giou_by_hand():
    a = torch.tensor([[0.0, 0.0, 10.0, 10.0]])
    b = torch.tensor(
        [
            [5.0, 0.0, 15.0, 10.0],  # half overlapping: 50 / 150
            [20.0, 0.0, 30.0, 10.0],  # disjoint, 10 apart: enclosing 300, union 200
            [0.0, 0.0, 10.0, 10.0],  # the same box
        ]
    )
    assert torch.allclose(box_iou(a, b), torch.tensor([[1 / 3, 0.0, 1.0]]))
    assert torch.allclose(generalized_box_iou(a, b), torch.tensor([[1 / 3, -1 / 3, 1.0]]))


def test_nms_keeps_the_best_of_each_overlapping_group_per_class():
    boxes = torch.tensor([[0.0, 0, 10, 10], [1, 0, 11, 10], [20, 20, 30, 30], [0, 0, 10, 10]])
    scores = torch.tensor([0.9, 0.8, 0.7, 0.95])
    assert nms(boxes, scores, 0.5).tolist() == [3, 2]  # 0 and 1 overlap 3 by IoU 1 and 9/11
    labels = torch.tensor([0, 1, 0, 0])
    assert sorted(batched_nms(boxes, scores, labels, 0.5).tolist()) == [1, 2, 3]  # 1 is another class
    assert batched_nms(boxes[:0], scores[:0], labels[:0], 0.5).numel() == 0


def greedy_nms(boxes: torch.Tensor, scores: torch.Tensor, iou_threshold: float) -> list[int]:
    """The textbook loop: take the best remaining box, drop what it covers, repeat."""
    remaining = scores.argsort(descending=True)
    kept = []
    while len(remaining):
        best, remaining = remaining[0], remaining[1:]
        kept.append(int(best))
        remaining = remaining[box_iou(boxes[best][None], boxes[remaining])[0] <= iou_threshold]
    return kept


@pytest.mark.parametrize("seed", range(6))
def test_nms_keeps_exactly_what_the_greedy_loop_keeps(seed: int):
    """Clustered boxes, so suppressions chain (a covers b, b would cover c): the case a one-pass matrix NMS
    gets wrong."""
    g = torch.Generator().manual_seed(seed)
    centres = torch.rand(8, 2, generator=g) * 100
    xy = centres[torch.randint(0, 8, (300,), generator=g)] + torch.randn(300, 2, generator=g) * 4
    wh = 5 + torch.rand(300, 2, generator=g) * 20
    boxes, scores = torch.cat([xy, xy + wh], 1), torch.rand(300, generator=g)
    labels = torch.randint(0, 3, (300,), generator=g)
    for threshold in (0.3, 0.5, 0.7):
        assert nms(boxes, scores, threshold).tolist() == greedy_nms(boxes, scores, threshold)
        expected = sorted(
            i
            for c in range(3)
            for i in torch.where(labels == c)[0][
                greedy_nms(boxes[labels == c], scores[labels == c], threshold)
            ].tolist()
        )
        assert sorted(batched_nms(boxes, scores, labels, threshold).tolist()) == expected


def test_focal_loss_by_hand():
    logits, targets = torch.tensor([0.0, 2.0]), torch.tensor([1.0, 0.0])
    # p = 0.5 for a positive: 0.25 * 0.5^2 * ln 2; p = sigmoid(2) for a negative: 0.75 * p^2 * -ln(1 - p)
    p = 1 / (1 + math.exp(-2))
    expected = 0.25 * 0.25 * math.log(2) + 0.75 * p**2 * -math.log(1 - p)
    assert sigmoid_focal_loss(logits, targets).item() == pytest.approx(expected, rel=1e-6)


def ground_truth(*boxes_per_image: list[tuple[int, list[float]]]) -> dict:
    """COCO ground truth: per image a list of (category id, xywh box)."""
    return {
        "images": [{"id": i + 1, "width": 100, "height": 100} for i in range(len(boxes_per_image))],
        "annotations": [
            {"image_id": i + 1, "category_id": c, "bbox": box}
            for i, boxes in enumerate(boxes_per_image)
            for c, box in boxes
        ],
        "categories": [{"id": 1, "name": "one"}, {"id": 2, "name": "two"}],
    }


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
    ranked = coco_ap(
        ground_truth([(1, [0, 0, 10, 10])]),
        [detection(1, 1, [50, 50, 10, 10], 0.9), detection(1, 1, [0, 0, 10, 10], 0.8)],
    )
    assert ranked.ap50 == pytest.approx(0.5)

    # One of two objects found: precision 1 up to recall 0.5, i.e. 51 of COCO's 101 recall points.
    half = coco_ap(
        ground_truth([(1, [0, 0, 10, 10]), (1, [50, 50, 10, 10])]), [detection(1, 1, [0, 0, 10, 10], 0.9)]
    )
    assert half.ap50 == pytest.approx(51 / 101)

    # Per class: "one" found, "two" missed; a class without ground truth is NaN, not 0.
    split = coco_ap(gt, [detection(1, 1, [10, 10, 20, 20], 0.9)])
    assert split.per_class == pytest.approx({"one": 1.0, "two": 0.0}) and split.ap == pytest.approx(0.5)
    assert split.per_class50 == pytest.approx({"one": 1.0, "two": 0.0})
    # Nothing to find at all: AP is undefined (NaN), found something or not, as for a class without boxes.
    empty = ground_truth([], [])
    assert all(
        math.isnan(scores.ap) and math.isnan(scores.ap50)
        for scores in (coco_ap(empty, []), coco_ap(empty, [detection(1, 1, [0, 0, 10, 10], 0.9)]))
    )
    absent = coco_ap(ground_truth([(1, [0, 0, 10, 10])]), [detection(1, 1, [0, 0, 10, 10], 0.9)])
    assert absent.per_class["one"] == pytest.approx(1.0) and math.isnan(absent.per_class["two"])
    assert coco_ap(gt, []).ap50 == 0.0


def test_predictions_convert_from_xyxy_labels_to_coco_entries():
    predictions = [
        {
            "boxes": torch.tensor([[10.0, 20.0, 30.0, 60.0]]),
            "labels": torch.tensor([1]),
            "scores": torch.tensor([0.5]),
        }
    ]
    assert detections_to_coco([7], predictions, label_to_category=[3, 9]) == [
        {"image_id": 7, "category_id": 9, "bbox": [10.0, 20.0, 20.0, 40.0], "score": 0.5}
    ]
    # The caller's boxes stay xyxy: the detector draws them on its W&B overlays afterwards.
    assert predictions[0]["boxes"].tolist() == [[10.0, 20.0, 30.0, 60.0]]


def test_digit_canvases_are_a_coco_data_set_with_exact_boxes(tmp_path):
    root = write_digit_canvases(tmp_path, train_images=40, val_images=10, seed=3)
    first = (root / "annotations" / "train.json").read_text()
    # reused, not redrawn
    assert write_digit_canvases(tmp_path, train_images=40, val_images=10, seed=3) == root
    assert (root / "annotations" / "train.json").read_text() == first
    data = CocoDetection(root / "annotations" / "train.json", root / "train")
    assert len(data) == 40 and data.class_names == [str(d) for d in range(10)]
    empty = 0
    for image, target in data:
        assert image.shape == (3, 96, 96) and image.min() >= 0 and image.max() <= 1
        empty += len(target["boxes"]) == 0
        for x1, y1, x2, y2 in target["boxes"].round().long().tolist():
            ink = image[0, y1:y2, x1:x2] * 255
            # Tight: ink touches every side of the box.
            assert (
                ink[0].max() >= INK
                and ink[-1].max() >= INK
                and ink[:, 0].max() >= INK
                and ink[:, -1].max() >= INK
            )
    assert 0 < empty < 40 and 0 <= int(torch.cat([t["labels"] for _, t in data]).max()) <= 9


def one_box_data(tmp_path, **kwargs) -> CocoDetection:
    """A 40x20 black image with a white 6x4 rectangle at x=2, y=3, annotated exactly."""
    pixels = np.zeros((20, 40, 3), np.uint8)
    pixels[3:7, 2:8] = 255
    Image.fromarray(pixels).save(tmp_path / "a.png")
    coco = {
        "images": [{"id": 1, "file_name": "a.png", "width": 40, "height": 20}],
        "annotations": [{"id": 1, "image_id": 1, "category_id": 5, "bbox": [2, 3, 6, 4]}],
        "categories": [{"id": 5, "name": "five"}],
    }
    (tmp_path / "a.json").write_text(json.dumps(coco))
    return CocoDetection(tmp_path / "a.json", tmp_path, **kwargs)


def test_flips_and_resizes_keep_boxes_on_their_objects(tmp_path):
    data = one_box_data(tmp_path, sizes=(80,), hflip=1.0)
    image, target = data[0]
    assert image.shape == (3, 40, 80) and target["labels"].tolist() == [0]
    # Flipped in a 40-wide image: x from 2..8 to 32..38; then everything doubles.
    assert target["boxes"].tolist() == [[64.0, 6.0, 76.0, 14.0]]
    # The rectangle's brightness (blurred at its edges by the resize) is centred on the box and inside it.
    brightness = image[0]
    ys, xs = torch.meshgrid(torch.arange(40.0) + 0.5, torch.arange(80.0) + 0.5, indexing="ij")
    centre = [(xs * brightness).sum() / brightness.sum(), (ys * brightness).sum() / brightness.sum()]
    assert torch.allclose(torch.stack(centre), torch.tensor([70.0, 10.0]), atol=0.01)
    assert brightness[5:15, 63:77].sum() == pytest.approx(brightness.sum())  # the blur spreads 1 px at most
    images, targets = collate([data[0], one_box_data(tmp_path)[0]])
    assert [i.shape[-1] for i in images] == [80, 40] and len(targets) == 2


def test_augmentations_follow_the_items_seed_and_leave_the_global_rng_alone(tmp_path):
    data = one_box_data(tmp_path, sizes=(40, 60, 80), hflip=0.5, jitter=0.3)
    global_state = torch.get_rng_state(), random.getstate()
    draws = {seed: data[(0, seed)] for seed in range(12)}
    assert torch.equal(global_state[0], torch.get_rng_state()) and global_state[1] == random.getstate()
    for seed, (image, target) in draws.items():  # the same key, the same image and boxes
        again, again_target = data[(0, seed)]
        assert torch.equal(image, again) and torch.equal(target["boxes"], again_target["boxes"])
    widths = {image.shape[-1] for image, _ in draws.values()}
    flipped = {target["boxes"][0, 0].item() / image.shape[-1] > 0.5 for image, target in draws.values()}
    assert widths == {40, 60, 80} and flipped == {True, False}  # other seeds, other draws


@pytest.mark.parametrize(
    "break_it, message",
    [
        (lambda coco, d: "{not json", "is not valid JSON"),
        (lambda coco, d: json.dumps({"images": []}), "lacks the COCO list(s) annotations, categories"),
        (
            lambda coco, d: json.dumps(
                {**coco, "annotations": [{**coco["annotations"][0], "bbox": [30, 3, 20, 4]}]}
            ),
            "annotation id 1 (image a.png) has bbox [30, 3, 20, 4] outside its 40x20 image",
        ),
        (
            lambda coco, d: json.dumps(
                {**coco, "annotations": [{**coco["annotations"][0], "category_id": 7}]}
            ),
            "annotation id 1 has category_id 7, which is not among the categories ([5])",
        ),
        (
            lambda coco, d: json.dumps({**coco, "images": [{**coco["images"][0], "file_name": "gone.png"}]}),
            "image id 1 names gone.png, which is not in",
        ),
        (
            lambda coco, d: json.dumps({**coco, "annotations": [{**coco["annotations"][0], "image_id": 9}]}),
            "annotation id 1 refers to image_id 9, which is not among the images",
        ),
    ],
)
def test_bad_coco_input_is_one_clear_line(tmp_path, break_it, message):
    one_box_data(tmp_path)
    coco = json.loads((tmp_path / "a.json").read_text())
    (tmp_path / "a.json").write_text(break_it(coco, tmp_path))
    with pytest.raises(UserError) as error:
        CocoDetection(tmp_path / "a.json", tmp_path)
    assert message in str(error.value) and "a.json" in str(error.value) and "\n" not in str(error.value)


def test_the_detector_follows_torchvisions_contract_and_its_loss_decreases(tmp_path):
    torch.manual_seed(0)
    root = write_digit_canvases(tmp_path, train_images=8, val_images=2, seed=1)
    data = CocoDetection(root / "annotations" / "train.json", root / "train")
    images, targets = collate([data[i] for i in range(8)])
    model = FCOSLite(num_classes=10, width=8)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(30):  # the same 8 images again and again: the loss must fall
        loss_parts = model(images, targets)
        assert set(loss_parts) == {"loss_classifier", "loss_box", "loss_centerness"}
        loss = sum(loss_parts.values())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]
    # Images without objects are negatives: only the classifier has something to learn from them.
    empty = {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.long)}
    negatives = model(images[:2], [empty, empty])
    assert negatives["loss_classifier"] > 0 and negatives["loss_box"] == 0 == negatives["loss_centerness"]
    model.eval()
    with torch.no_grad():
        detections = model([images[0], images[1][:, :80, :72]])  # any image size
    assert [d["boxes"].shape[1] for d in detections] == [4, 4]
    assert all(d["boxes"][:, 2:].le(torch.tensor([96.0, 96.0])).all() for d in detections[:1])
    assert detections[1]["boxes"][:, 0::2].max() <= 72 and detections[1]["boxes"][:, 1::2].max() <= 80
    assert all(len(d["labels"]) == len(d["scores"]) == len(d["boxes"]) for d in detections)


SMALL_CANVASES = ["data.canvases.train_images=64", "data.canvases.val_images=16"]


def pycocotools_summary(run_dir: Path) -> list[float]:
    """AP, AP50 and AP75 of the run's last weights on its validation images, from COCOeval.summarize."""
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    cfg = OmegaConf.load(run_dir / "config.yaml")
    data = instantiate(cfg.data, _convert_="all")
    data.setup("fit")
    model = instantiate(cfg.model.detector)
    weights = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]
    model.load_state_dict({k.removeprefix("detector."): v for k, v in weights.items()})
    results = []
    with torch.no_grad():
        for image, target in data.val_set:
            (found,) = model.eval()([image])
            for (x1, y1, x2, y2), label, score in zip(
                found["boxes"].tolist(), found["labels"].tolist(), found["scores"].tolist()
            ):
                results.append(
                    {
                        "image_id": int(target["image_id"]),
                        "bbox": [x1, y1, x2 - x1, y2 - y1],
                        "category_id": data.val_set.category_ids[label],
                        "score": score,
                    }
                )
    gt = COCO(str(data.val_set.annotation_file))
    evaluation = COCOeval(gt, gt.loadRes(results), iouType="bbox")
    evaluation.evaluate()
    evaluation.accumulate()
    evaluation.summarize()
    return [float(v) for v in evaluation.stats[:3]]


@pytest.mark.slow
def test_done_when_command_writes_ap_to_metrics_json(tmp_path, home):
    run_dir = tmp_path / "run"
    # 40 steps: AP well above 0 (0.14 with seed 0), so the comparison with pycocotools below means something.
    done = run_cli(
        "+exp=detector",
        "++trainer.max_epochs=1",
        "++trainer.limit_train_batches=40",
        "++trainer.limit_val_batches=2",
        *SMALL_CANVASES,
        "data.canvases.train_images=640",
        f"hydra.run.dir={run_dir}",
        home=home,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    metrics = json.loads((run_dir / "metrics.json").read_text())
    reference = pycocotools_summary(run_dir)  # the last checkpoint scored by pycocotools itself
    for key, value in zip(("val/AP", "val/AP50", "val/AP75"), reference):
        # float32 logs
        assert metrics[key]["mode"] == "max" and metrics[key]["final"] == pytest.approx(value, rel=1e-6), key
    assert metrics["val/AP50"]["final"] > 0.05
    # W&B: validation images with predicted and true boxes, and the per-class AP table.
    run = read_run(find_runs(run_dir / "wandb")[0])
    overlays, table = run.summary["val/boxes"], run.summary["val/per_class_AP"]
    assert overlays["_type"] == "images/separated" and overlays["count"] == 8
    truths = [
        json.loads(run.file_path(image["ground_truth"]["path"]).read_text())["box_data"]
        for image in overlays["all_boxes"]
    ]
    assert sum(map(len, truths)) > 0  # (some canvases are empty)
    assert all({"position", "class_id"} <= box.keys() for boxes in truths for box in boxes)
    assert table["_type"] == "table-file" and (table["nrows"], table["ncols"]) == (10, 3)


@pytest.mark.slow
def test_a_malformed_coco_file_fails_the_run_in_one_line(tmp_path, home):
    (tmp_path / "bad.json").write_text('{"images": [')
    paths = [
        f"data.{split}_{kind}={tmp_path / ('bad.json' if kind == 'annotations' else '')}"
        for split in ("train", "val")
        for kind in ("annotations", "images")
    ]
    done = run_cli("+exp=detector", *paths, f"hydra.run.dir={tmp_path / 'run'}", home=home)
    assert_clean_failure(done, "bad.json is not valid JSON")


def test_a_model_sized_for_other_classes_is_refused(tmp_path):
    cfg = compose_config(
        "+exp=detector",
        "model.detector.num_classes=3",
        *SMALL_CANVASES,
        f"data.cache_dir={tmp_path}",
        "logger=none",
        run_dir=tmp_path / "run",
    )
    with pytest.raises(UserError, match=r"model\.detector\.num_classes=3, but the data has 10 categories"):
        train(cfg)


def test_a_poisoned_detector_batch_halts_and_replays(tmp_path):
    # A bundle of a detector step holds a batch of image lists and target dicts; replay re-runs it alone.
    run_dir = tmp_path / "run"
    cfg = compose_config(
        "+exp=detector",
        *SMALL_CANVASES,
        f"data.cache_dir={tmp_path}",
        "logger=none",
        "++trainer.limit_train_batches=4",
        "++trainer.max_epochs=1",
        "divergence.inject.step=2",
        "divergence.action=halt",
        run_dir=run_dir,
    )
    with pytest.raises(UserError, match="divergence at step 2"):
        train(cfg)
    reproduced, probe, _ = replay(str(run_dir / "divergence" / "step000002-nonfinite"))
    assert reproduced and probe.first_nonfinite_output == "detector.backbone.0.0"  # the batch's first layer


@pytest.mark.slow
def test_resuming_with_more_epochs_than_the_schedule_was_planned_for_fails_in_one_line(
    tmp_path: Path, home: Path
):
    run_dir = tmp_path / "run"
    args = [
        "+exp=detector",
        *SMALL_CANVASES,
        f"data.cache_dir={tmp_path}",
        "logger=none",
        f"hydra.run.dir={run_dir}",
    ]
    first = run_cli(*args, "++trainer.max_epochs=1", home=home)
    assert first.returncode == 0, first.stderr[-3000:]
    longer = run_cli(*args, "++trainer.max_epochs=2", home=home)
    assert_clean_failure(longer, "learning-rate schedule (OneCycleLR) ends at step 4 and this run asks for 8")
    assert last_step(run_dir) == 4  # the checkpoint is untouched
