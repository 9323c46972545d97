"""The detector's embedded default data set, made offline from real handwriting: scikit-learn's digits
(1,797 scanned 8x8 digits) pasted at random scales and positions onto noisy canvases, with exact boxes
(the tight box around each pasted digit's ink), written once as a COCO-format data set on disk.

Training and validation canvases draw from disjoint digit scans, so validation AP measures handwriting
the detector has not seen. About one canvas in ten has no digit: a negative.
"""

import json
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from sklearn.datasets import load_digits
from sklearn.utils import Bunch

VERSION = 1  # bump when the drawing changes: existing copies are then rewritten
INK = 64  # a resized digit pixel at or above this (of 255) counts as ink for its box


def write_digit_canvases(
    root: str | Path,
    train_images: int = 2000,
    val_images: int = 300,
    size: int = 96,
    digit_sizes: tuple[int, int] = (16, 40),
    max_digits: int = 4,
    seed: int = 0,
) -> Path:
    """Writes root/{train,val}/*.png and root/annotations/{train,val}.json, unless a copy with the same
    settings is already there; returns root."""
    root = Path(root)
    spec = {
        "version": VERSION,
        "train_images": train_images,
        "val_images": val_images,
        "size": size,
        "digit_sizes": list(digit_sizes),
        "max_digits": max_digits,
        "seed": seed,
    }
    marker = root / "spec.json"
    if marker.is_file() and json.loads(marker.read_text()) == spec:
        return root
    digits = load_digits()
    assert isinstance(digits, Bunch)  # (not return_X_y's tuple)
    order = np.random.default_rng(seed).permutation(len(digits.images))
    split = int(0.8 * len(order))
    rng = np.random.default_rng(seed + 1)
    for name, count, scans in (("train", train_images, order[:split]), ("val", val_images, order[split:])):
        coco = _draw_split(root / name, count, scans, digits, size, digit_sizes, max_digits, rng)
        (root / "annotations").mkdir(parents=True, exist_ok=True)
        (root / "annotations" / f"{name}.json").write_text(json.dumps(coco))
    marker.write_text(json.dumps(spec))  # last: an interrupted write is redone
    return root


def _draw_split(
    folder: Path,
    count: int,
    scans: np.ndarray,
    digits: Any,
    size: int,
    digit_sizes: tuple[int, int],
    max_digits: int,
    rng: np.random.Generator,
) -> dict[str, Any]:
    folder.mkdir(parents=True, exist_ok=True)
    images, annotations = [], []
    for image_id in range(1, count + 1):
        canvas = rng.normal(24, 12, (size, size)).clip(0, 255)  # sensor-like background noise
        placed: list[list[float]] = []
        for _ in range(rng.integers(0, max_digits + 1) if rng.random() > 0.1 else 0):
            scan = scans[rng.integers(len(scans))]
            side = int(rng.integers(digit_sizes[0], digit_sizes[1] + 1))
            ink = np.asarray(
                Image.fromarray((digits.images[scan] * 255 / 16).astype(np.uint8)).resize(
                    (side, side), Image.Resampling.BICUBIC
                ),
                dtype=np.float64,
            )
            rows, cols = np.nonzero(ink >= INK)
            if not len(rows):
                continue
            for _attempt in range(20):  # a free spot: overlapping digits would make ambiguous boxes
                x, y = (int(v) for v in rng.integers(0, size - side + 1, 2))
                box = [
                    x + cols.min(),
                    y + rows.min(),
                    cols.max() - cols.min() + 1,
                    rows.max() - rows.min() + 1,
                ]
                if all(not _overlaps(box, other) for other in placed):
                    break
            else:
                continue
            canvas[y : y + side, x : x + side] = np.maximum(canvas[y : y + side, x : x + side], ink)
            placed.append(box)
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "image_id": image_id,
                    "category_id": int(digits.target[scan]) + 1,
                    "bbox": [float(v) for v in box],
                    "area": float(box[2] * box[3]),
                    "iscrowd": 0,
                }
            )
        file_name = f"{image_id:06d}.png"
        Image.fromarray(canvas.astype(np.uint8)).save(folder / file_name)
        images.append({"id": image_id, "file_name": file_name, "width": size, "height": size})
    categories = [{"id": d + 1, "name": str(d)} for d in range(10)]  # ids from 1, as COCO's
    return {"images": images, "annotations": annotations, "categories": categories}


def _overlaps(a: list[float], b: list[float]) -> bool:
    return a[0] < b[0] + b[2] and b[0] < a[0] + a[2] and a[1] < b[1] + b[3] and b[1] < a[1] + a[3]
