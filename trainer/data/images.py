"""Image data for generative models: tensors in [-1, 1] of shape (channels, image_size, image_size).

Three sources share one DataModule: scikit-learn's handwritten digits (ships offline, the default), any
folder of images, and Hugging Face hub data sets such as CIFAR-10 or CelebA (needs internet once).
"""

from collections.abc import Callable, Sequence, Sized
from pathlib import Path
from typing import Any, Literal

import lightning as L
import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch.utils.data import DataLoader, Dataset, Subset

from trainer.config.ranges import FractionBelowOne, NonNegative, Partition, Positive, Seed
from trainer.data.evaluation import Indexed, evaluation_loader
from trainer.data.loading import ResumableLoader, partition_classes
from trainer.errors import UserError

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff"}


def image_to_tensor(image: Image.Image, size: int, channels: int) -> torch.Tensor:
    """Resize the short side to `size`, center-crop to a square, scale to [-1, 1]."""
    image = image.convert("L" if channels == 1 else "RGB")
    scale = size / min(image.size)
    w, h = max(size, round(image.width * scale)), max(size, round(image.height * scale))
    image = image.resize((w, h), Image.Resampling.BICUBIC)
    left, top = (w - size) // 2, (h - size) // 2
    image = image.crop((left, top, left + size, top + size))
    array = np.asarray(image, dtype=np.float32).reshape(size, size, channels)
    return torch.from_numpy(array).permute(2, 0, 1).div(127.5).sub(1.0)


class TensorImages(Dataset):
    def __init__(self, images: torch.Tensor, classes: Sequence[int] | None = None):
        self.images, self.classes = images, classes

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> torch.Tensor:
        return self.images[index]


class ImageFiles(Dataset):
    """Decodes lazily; an unreadable file fails with its path named."""

    def __init__(self, paths: Sequence[Path], size: int, channels: int, classes: Sequence[int] | None = None):
        self.paths, self.size, self.channels, self.classes = list(paths), size, channels, classes

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> torch.Tensor:
        path = self.paths[index]
        try:
            with Image.open(path) as image:
                return image_to_tensor(image, self.size, self.channels)
        except (OSError, UnidentifiedImageError, ValueError) as e:
            raise UserError(f"cannot read image {path} ({e}): remove or replace the file") from None


class MappedImages(Dataset):
    """Any indexable of PIL images (for example a Hugging Face data set column)."""

    def __init__(
        self,
        items: Any,
        to_image: Callable[[Any], Image.Image],
        size: int,
        channels: int,
        classes: Sequence[int] | None = None,
    ):
        self.items, self.to_image, self.size, self.channels = items, to_image, size, channels
        self.classes = classes

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> torch.Tensor:
        return image_to_tensor(self.to_image(self.items[index]), self.size, self.channels)


class ImageDataModule(L.LightningDataModule):
    """Splits one image source into train and validation with a fixed seed; subclasses load the source."""

    def __init__(
        self,
        image_size: Positive = 32,
        channels: Literal[1, 3] = 1,  # grey or RGB
        batch_size: Positive = 64,
        val_fraction: FractionBelowOne = 0.1,  # (1 would leave nothing to train on)
        num_workers: NonNegative = 0,
        pin_memory: bool = False,
        channels_last: bool = False,
        partition: Partition = "iid",
        seed: Seed = 0,
    ):
        super().__init__()
        partition_classes(partition, [])  # the name's check, before any loading
        if not 0.0 <= val_fraction < 1.0:
            raise UserError(f"data.val_fraction must be in [0, 1), got {val_fraction}")
        self.image_size, self.channels, self.batch_size = image_size, channels, batch_size
        self.val_fraction, self.num_workers, self.pin_memory = val_fraction, num_workers, pin_memory
        self.channels_last, self.partition, self.seed = channels_last, partition, seed
        self.train_classes: list[int] | None = None  # each training image's class, where the source has them
        self.train_set: Subset | None = None
        self.val_set: Subset | None = None

    def load(self) -> Dataset:
        raise NotImplementedError

    def setup(self, stage: str) -> None:
        if self.train_set is not None:
            return
        dataset = self.load()
        assert isinstance(dataset, Sized)  # (a map-style data set)
        order = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(self.seed)).tolist()
        n_val = round(len(dataset) * self.val_fraction)
        self.val_set = Subset(dataset, order[:n_val])
        self.train_set = Subset(dataset, order[n_val:])
        classes = getattr(dataset, "classes", None)
        if classes is not None:
            self.train_classes = [int(classes[i]) for i in order[n_val:]]
        if len(self.train_set) < self.batch_size:
            raise UserError(
                f"only {len(self.train_set)} training images, fewer than data.batch_size={self.batch_size}: "
                "add images or lower data.batch_size"
            )

    def train_dataloader(self) -> ResumableLoader:
        assert self.train_set is not None  # (setup)
        return ResumableLoader(
            self.train_set,
            batch_size=self.batch_size,
            seed=self.seed,
            classes=partition_classes(self.partition, self.train_classes),
            drop_last=True,  # full batches keep BatchNorm statistics and DDP steps even
            num_workers=self.num_workers,
            pin_memory=self.pin_memory,
            persistent_workers=self.num_workers > 0,
        )

    def val_dataloader(self) -> DataLoader:
        """(index, image) batches: validation results are keyed by image (trainer/data/evaluation.py)."""
        assert self.val_set is not None  # (setup)
        return evaluation_loader(
            Indexed(self.val_set), self.batch_size, num_workers=self.num_workers, pin_memory=self.pin_memory
        )

    def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        if not self.channels_last:
            return batch
        if isinstance(batch, torch.Tensor):
            return batch.contiguous(memory_format=torch.channels_last)
        index, images = batch
        return index, images.contiguous(memory_format=torch.channels_last)


class DigitsDataModule(ImageDataModule):
    """scikit-learn's 1,797 real 8x8 handwritten digits (17 grey levels), upscaled to `image_size`."""

    def load(self) -> Dataset:
        from sklearn.datasets import load_digits
        from sklearn.utils import Bunch

        bunch = load_digits()
        assert isinstance(bunch, Bunch)  # (not return_X_y's tuple)
        digits = (bunch.images * (255.0 / 16.0)).astype(np.uint8)
        images = [image_to_tensor(Image.fromarray(d), self.image_size, self.channels) for d in digits]
        return TensorImages(torch.stack(images), classes=bunch.target.tolist())


class ImageFolderDataModule(ImageDataModule):
    """Every image file under `root`, searched recursively."""

    def __init__(self, root: str, **kwargs: Any):
        super().__init__(**kwargs)
        self.root = Path(root).expanduser()

    def load(self) -> Dataset:
        if not self.root.is_dir():
            raise UserError(
                f"data.root={self.root} is not a directory: point data.root at a folder of images"
            )
        paths = sorted(p for p in self.root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
        if not paths:
            raise UserError(f"no images ({', '.join(sorted(IMAGE_SUFFIXES))}) under data.root={self.root}")
        for path in paths:  # reading headers is cheap and catches broken files before training starts
            try:
                with Image.open(path):
                    pass
            except (OSError, UnidentifiedImageError) as e:
                raise UserError(f"cannot read image {path} ({e}): remove or replace the file") from None
        # A class per subfolder, as in ImageFolder (data.partition=by_class); images directly in root: one
        folders = [p.relative_to(self.root).parts[0] if p.parent != self.root else "" for p in paths]
        index = {name: i for i, name in enumerate(sorted(set(folders)))}
        classes = [index[folder] for folder in folders]
        return ImageFiles(paths, self.image_size, self.channels, classes)


class HubImageDataModule(ImageDataModule):
    """A Hugging Face data set with an image column, e.g. name=uoft-cs/cifar10 image_key=img."""

    name: str  # the data set's (a LightningDataModule's own may be None)

    def __init__(
        self,
        name: str,
        split: str = "train",
        image_key: str = "image",
        label_key: str | None = None,
        data_dir: str | None = None,
        **kwargs: Any,
    ):
        super().__init__(**kwargs)
        self.name, self.split, self.image_key, self.data_dir = name, split, image_key, data_dir
        self.label_key = label_key

    def load(self) -> Dataset:
        try:
            import datasets
        except ImportError:
            raise UserError(
                "data=hub needs the `datasets` package: pip install 'guarded-trainer[hub]'"
            ) from None
        try:
            table = datasets.load_dataset(self.name, split=self.split, data_dir=self.data_dir)
        except Exception as e:  # network, auth and name errors all end here
            raise UserError(f"cannot load hub data set {self.name!r} split {self.split!r}: {e}") from None
        for key, value in (("image_key", self.image_key), ("label_key", self.label_key)):
            if value is not None and value not in table.column_names:
                raise UserError(
                    f"hub data set {self.name!r} has no column {value!r}; "
                    f"set data.{key} to one of {table.column_names}"
                )
        classes = table[self.label_key] if self.label_key else None
        return MappedImages(table, lambda row: row[self.image_key], self.image_size, self.channels, classes)
