"""COCO-format detection data: an annotation json (images, annotations, categories) and an image folder.

Every entry is checked when the data set is opened, so a bad file fails before training with the file and
the entry named. Images without annotations are kept: they train as negatives. Targets follow torchvision's
detection contract: xyxy boxes in pixels and labels 0..K-1 (the categories in id order).
"""

import json
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch.utils.data import DataLoader, Dataset

from trainer.config.ranges import Fraction, NonNegative, Partition, Positive, Seed
from trainer.data.digit_canvases import write_digit_canvases
from trainer.data.evaluation import evaluation_loader
from trainer.data.loading import ResumableLoader, partition_classes
from trainer.errors import UserError

Target = dict[str, torch.Tensor]
EDGE_SLACK = 1.0  # pixels a box may stick out of its image (rounding in exported files); it is clipped


def read_coco(annotation_file: Path, image_dir: Path) -> dict[str, Any]:
    """The parsed file, checked entry by entry; UserError naming the file and the entry otherwise."""
    try:
        coco = json.loads(annotation_file.read_text())
    except FileNotFoundError:
        raise UserError(
            f"{annotation_file} does not exist: point data.train_annotations / "
            "data.val_annotations at a COCO-format json"
        ) from None
    except json.JSONDecodeError as e:
        raise UserError(
            f"{annotation_file} is not valid JSON ({e.msg}, line {e.lineno} column {e.colno}): "
            "fix or re-export the file"
        ) from None
    missing = [key for key in ("images", "annotations", "categories") if not isinstance(coco.get(key), list)]
    if missing:
        raise UserError(
            f"{annotation_file} lacks the COCO list(s) {', '.join(missing)}: a detection file needs "
            "'images', 'annotations' and 'categories'"
        )
    images = {image["id"]: image for image in coco["images"]}
    categories = {category["id"] for category in coco["categories"]}
    for image in coco["images"]:
        if not (image_dir / image["file_name"]).is_file():
            raise UserError(
                f"{annotation_file}: image id {image['id']} names {image['file_name']}, which is "
                f"not in {image_dir}: fix file_name or the image folder"
            )
    for a in coco["annotations"]:
        where = f"{annotation_file}: annotation id {a.get('id')}"
        if a.get("image_id") not in images:
            raise UserError(f"{where} refers to image_id {a.get('image_id')}, which is not among the images")
        if a.get("category_id") not in categories:
            raise UserError(
                f"{where} has category_id {a.get('category_id')}, which is not among the "
                f"categories ({sorted(categories)}): fix the annotation or add the category"
            )
        image = images[a["image_id"]]
        x, y, w, h = a["bbox"]
        if (
            w <= 0
            or h <= 0
            or x < -EDGE_SLACK
            or y < -EDGE_SLACK
            or x + w > image["width"] + EDGE_SLACK
            or y + h > image["height"] + EDGE_SLACK
        ):
            raise UserError(
                f"{where} (image {image['file_name']}) has bbox {a['bbox']} outside its "
                f"{image['width']}x{image['height']} image: bbox is [x, y, width, height] in pixels"
            )
    return coco


class CocoDetection(Dataset):
    """(image in [0, 1], 3 x H x W; target with boxes, labels, image_id) per image of a COCO file.

    Training augmentations keep the boxes right: a horizontal flip with probability `hflip`, a resize of
    the longer side to a random size in `sizes`, and brightness/contrast jitter of up to `jitter`. They draw
    from a generator seeded by the key: `(index, seed)` from the training sampler (trainer/data/loading.py),
    or the index alone; never from the global RNG, so a resumed run augments as an uninterrupted one.
    """

    def __init__(
        self,
        annotation_file: str | Path,
        image_dir: str | Path,
        sizes: tuple[int, ...] = (),
        hflip: float = 0.0,
        jitter: float = 0.0,
    ):
        self.annotation_file, self.image_dir = Path(annotation_file), Path(image_dir)
        self.coco = read_coco(self.annotation_file, self.image_dir)
        self.sizes, self.hflip, self.jitter = tuple(sizes), hflip, jitter
        self.category_ids = sorted(c["id"] for c in self.coco["categories"])
        self.label_of = {category_id: label for label, category_id in enumerate(self.category_ids)}
        self.images = sorted(self.coco["images"], key=lambda image: image["id"])
        self.boxes_of: dict[int, list[dict[str, Any]]] = {image["id"]: [] for image in self.images}
        for a in self.coco["annotations"]:
            if not a.get("iscrowd", 0):
                self.boxes_of[a["image_id"]].append(a)

    @property
    def classes(self) -> list[int]:
        """Each image's class for `data.partition=by_class`: the label most of its boxes have (the smallest
        on a tie; -1 for an image without boxes)."""
        classes = []
        for image in self.images:
            labels = [self.label_of[a["category_id"]] for a in self.boxes_of[image["id"]]]
            classes.append(min(set(labels), key=lambda c: (-labels.count(c), c)) if labels else -1)
        return classes

    @property
    def class_names(self) -> list[str]:
        names = {c["id"]: c["name"] for c in self.coco["categories"]}
        return [names[i] for i in self.category_ids]

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, key: int | tuple[int, int]) -> tuple[torch.Tensor, Target]:
        index, seed = key if isinstance(key, tuple) else (key, key)
        info = self.images[index]
        path = self.image_dir / info["file_name"]
        try:
            with Image.open(path) as image:
                image = image.convert("RGB")
        except (OSError, UnidentifiedImageError) as e:
            raise UserError(
                f"{path} (image id {info['id']}) cannot be read ({e}): replace the file"
            ) from None
        annotations = self.boxes_of[info["id"]]
        boxes = torch.tensor([a["bbox"] for a in annotations], dtype=torch.float32).reshape(-1, 4)
        boxes[:, 2:] += boxes[:, :2]  # xywh -> xyxy
        boxes[:, 0::2] = boxes[:, 0::2].clamp(0, image.width)
        boxes[:, 1::2] = boxes[:, 1::2].clamp(0, image.height)
        labels = torch.tensor([self.label_of[a["category_id"]] for a in annotations], dtype=torch.long)
        draws = torch.Generator().manual_seed(seed)
        image, boxes = self.augment(image, boxes, draws)
        pixels = torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0).permute(2, 0, 1)
        if self.jitter:
            pixels = jitter_colours(pixels, self.jitter, draws)
        return pixels, {"boxes": boxes, "labels": labels, "image_id": torch.tensor(info["id"])}

    def augment(
        self, image: Image.Image, boxes: torch.Tensor, draws: torch.Generator
    ) -> tuple[Image.Image, torch.Tensor]:
        if self.hflip and torch.rand((), generator=draws) < self.hflip:
            image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
            boxes = torch.stack(
                [image.width - boxes[:, 2], boxes[:, 1], image.width - boxes[:, 0], boxes[:, 3]], 1
            )
        if self.sizes:
            scale = self.sizes[int(torch.randint(len(self.sizes), (), generator=draws))] / max(image.size)
            size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
            boxes = boxes * torch.tensor([size[0] / image.width, size[1] / image.height] * 2)
            image = image.resize(size, Image.Resampling.BILINEAR)
        return image, boxes


def jitter_colours(pixels: torch.Tensor, strength: float, draws: torch.Generator) -> torch.Tensor:
    """Brightness and contrast each scaled by a factor in [1 - strength, 1 + strength]; boxes unchanged."""
    brightness, contrast = (1 + strength * (2 * torch.rand(2, generator=draws) - 1)).tolist()
    mean = pixels.mean()
    return ((pixels * brightness - mean) * contrast + mean).clamp(0, 1)


def collate(batch: list[tuple[torch.Tensor, Target]]) -> tuple[list[torch.Tensor], list[Target]]:
    """Images of different sizes stay a list, as torchvision's detection models take them."""
    images, targets = zip(*batch)
    return list(images), list(targets)


class CocoDataModule(L.LightningDataModule):
    """Train and validation COCO files; without them, the embedded digit canvases (written once to
    `cache_dir`, trainer/data/digit_canvases.py)."""

    def __init__(
        self,
        train_annotations: str | None = None,
        train_images: str | None = None,
        val_annotations: str | None = None,
        val_images: str | None = None,
        canvases: dict[str, NonNegative] | None = None,  # images per split, and their seed
        cache_dir: str = ".",
        sizes: tuple[Positive, ...] = (),
        hflip: Fraction = 0.0,  # a probability
        jitter: Fraction = 0.0,  # brightness and contrast factors within 1 +- jitter (1: black at worst)
        batch_size: Positive = 16,
        num_workers: NonNegative = 0,
        pin_memory: bool = False,
        partition: Partition = "iid",
        seed: Seed = 0,
    ):
        super().__init__()
        partition_classes(partition, [])  # the name's check, before any loading
        paths = (train_annotations, train_images, val_annotations, val_images)
        if any(paths) and not all(paths):
            raise UserError(
                "data.train_annotations, train_images, val_annotations and val_images go together: "
                "set all four, or none for the embedded digit canvases"
            )
        self.paths, self.canvases, self.cache_dir = paths, dict(canvases or {}), Path(cache_dir)
        self.sizes, self.hflip, self.jitter = tuple(sizes), hflip, jitter  # training only
        self.batch_size, self.num_workers, self.seed = batch_size, num_workers, seed
        self.pin_memory, self.partition = pin_memory, partition
        self.train_set: CocoDetection | None = None
        self.val_set: CocoDetection | None = None

    def prepare_data(self) -> None:
        if not any(self.paths):
            # (numbers only: the canvas settings that are ints; digit_sizes keeps its default)
            write_digit_canvases(self.canvas_root, **self.canvases)  # pyright: ignore[reportArgumentType]

    @property
    def canvas_root(self) -> Path:
        return self.cache_dir / "digit_canvases"

    def setup(self, stage: str) -> None:
        if self.train_set is not None:
            return
        root = self.canvas_root
        given = [Path(p) for p in self.paths if p]  # all four or none (__init__)
        train_annotations, train_images, val_annotations, val_images = (
            given
            if given
            else (
                root / "annotations" / "train.json",
                root / "train",
                root / "annotations" / "val.json",
                root / "val",
            )
        )
        self.train_set = CocoDetection(train_annotations, train_images, self.sizes, self.hflip, self.jitter)
        self.val_set = CocoDetection(val_annotations, val_images)  # at full size: AP in the file's pixels
        if self.train_set.category_ids != self.val_set.category_ids:
            raise UserError(
                f"{train_annotations} and {val_annotations} have different categories: "
                "both splits need the same category list"
            )

    def train_dataloader(self) -> ResumableLoader:
        assert self.train_set is not None  # (setup)
        return ResumableLoader(
            self.train_set,
            batch_size=self.batch_size,
            seed=self.seed,
            classes=partition_classes(self.partition, self.train_set.classes),
            item_seeds=True,
            drop_last=True,
            num_workers=self.num_workers,
            collate_fn=collate,
            pin_memory=self.pin_memory,
            persistent_workers=self.num_workers > 0,
        )

    def val_dataloader(self) -> DataLoader:
        """Each rank's share of the images; the targets carry the image ids that results are keyed by."""
        assert self.val_set is not None  # (setup)
        return evaluation_loader(
            self.val_set,
            self.batch_size,
            num_workers=self.num_workers,
            pin_memory=self.pin_memory,
            collate_fn=collate,
        )
