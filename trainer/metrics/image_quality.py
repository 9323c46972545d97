"""FID and Inception Score of generated images, with a small classifier of the training images in place of
Inception (whose weights cannot be downloaded offline, and which has never seen 8x8 digit scans).

The classifier is trained once on the real training images and their classes (seconds on a CPU), with a
fixed seed, and cached under a name that hashes its recipe and its data, so every run of the same data uses
the same one. Its penultimate features give the Fréchet distance (FID: generated images against the
training images) and its class probabilities the Inception Score, exp E_x KL(p(y|x) || p(y)), over the
whole set at once (no splits: a validation set of a few hundred images is too small to split).

The real data's own figures put both on a scale: the validation images scored the same way give the FID a
generator that draws from the data itself would get (its floor: finite samples of one distribution are
never at distance 0) and the Inception Score of real images (its ceiling, in practice).
"""

import contextlib
import hashlib
import json
import math
import os
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

VERSION = 1  # bump when the training below changes: cached classifiers are keyed by it


@dataclass(frozen=True)
class ClassifierRecipe:
    width: int = 16  # channels of the first convolution; the second has twice as many
    features: int = 64  # the penultimate layer: the FID's feature space
    epochs: int = 8
    batch_size: int = 64
    lr: float = 4e-3  # peak of a one-cycle schedule
    shift: float = 1 / 16  # random translations up to this fraction of the image side, for held-out images
    seed: int = 0


class ImageClassifier(nn.Module):
    """Two convolution blocks, pooled to 4x4 whatever the image size, then the features and the classes."""

    def __init__(self, channels: int, classes: int, width: int, features: int):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(channels, width, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(width, 2 * width, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.AdaptiveAvgPool2d(4),
            nn.Flatten(),
            nn.Linear(2 * width * 16, features),
            nn.ReLU(),
        )
        self.head = nn.Linear(features, classes)
        self.num_features = features  # read by torchmetrics' FID when given this module

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """The penultimate features (what a custom FID feature extractor returns)."""
        return self.body(images)

    def logits(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(images))


@dataclass
class Embedding:
    """Images as the classifier sees them: penultimate features and class log-probabilities, float64."""

    features: torch.Tensor
    log_probs: torch.Tensor

    def __getitem__(self, index: int) -> "Embedding":
        return Embedding(self.features[index], self.log_probs[index])

    @staticmethod
    def stack(rows: Sequence["Embedding"]) -> "Embedding":
        return Embedding(torch.stack([r.features for r in rows]), torch.stack([r.log_probs for r in rows]))


class ImageQuality:
    """FID against one data set's training images, and Inception Score; with the real validation images'
    own figures, `fid_floor` and `inception_score_ceiling`, to read them by."""

    def __init__(self, classifier: ImageClassifier, train_images: torch.Tensor, val_images: torch.Tensor):
        self.classifier = classifier.eval()
        self.reference = self.embed(train_images).features
        real = self.embed(val_images)
        self.fid_floor, self.inception_score_ceiling = self.fid(real), inception_score(real.log_probs)

    @torch.no_grad()
    def embed(self, images: torch.Tensor, batch_size: int = 256) -> Embedding:
        """On the CPU, where the classifier lives: a few hundred small images take milliseconds."""
        features = torch.cat([self.classifier(batch.float().cpu()) for batch in images.split(batch_size)])
        return Embedding(features.double(), self.classifier.head(features).double().log_softmax(-1))

    def fid(self, embedding: Embedding) -> float:
        return float(frechet_distance(embedding.features, self.reference))


def inception_score(log_probs: torch.Tensor) -> float:
    """exp of the mean KL divergence of p(y|x) from the marginal p(y): the number of classes when each image
    is one class for sure and the classes are equally common, 1 when every image gets the same p(y|x)."""
    log_marginal = log_probs.exp().mean(0).log()
    kl = (log_probs.exp() * (log_probs - log_marginal)).sum(1)
    return float(kl.mean().exp())


def frechet_distance(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """||mu_x - mu_y||^2 + Tr(Sx + Sy - 2 (Sx Sy)^1/2) between Gaussians fitted to two feature sets (rows);
    NaN when a feature is not finite (a diverged generator's samples), as the metric is undefined there."""
    if not (x.isfinite().all() and y.isfinite().all()):
        return torch.tensor(math.nan, dtype=x.dtype)
    mu_x, mu_y = x.mean(0), y.mean(0)
    cov_x, cov_y = torch.cov(x.T), torch.cov(y.T)
    # Tr((Sx Sy)^1/2) = sum of sqrt of the eigenvalues of Sx^1/2 Sy Sx^1/2, which is symmetric PSD.
    vals, vecs = torch.linalg.eigh(cov_x)
    sqrt_x = vecs @ torch.diag(vals.clamp(min=0).sqrt()) @ vecs.T
    cross = torch.linalg.eigvalsh(sqrt_x @ cov_y @ sqrt_x).clamp(min=0).sqrt().sum()
    return (mu_x - mu_y).square().sum() + cov_x.trace() + cov_y.trace() - 2 * cross


# -- the classifier: trained once per recipe and data, then read from the cache --------------------------


def classifier_path(
    cache_dir: Path, images: torch.Tensor, labels: torch.Tensor, recipe: ClassifierRecipe
) -> Path:
    """<cache_dir>/image-classifier-<hash>.pt, the hash of everything the weights depend on: this code's
    version, the recipe, the architecture and the training images (their size, scaling and split) and
    classes."""
    digest = hashlib.sha256()
    classes = int(labels.max()) + 1
    architecture = repr(new_classifier(images.shape[1], classes, recipe))
    spec = {"version": VERSION, "recipe": asdict(recipe), "architecture": architecture}
    digest.update(json.dumps(spec, sort_keys=True).encode())
    digest.update(str(tuple(images.shape)).encode())
    digest.update(images.float().contiguous().numpy().tobytes())
    digest.update(labels.long().contiguous().numpy().tobytes())
    return cache_dir / f"image-classifier-{digest.hexdigest()[:16]}.pt"


def load_or_train_classifier(
    cache_dir: str | Path, images: torch.Tensor, labels: torch.Tensor, recipe: ClassifierRecipe
) -> ImageClassifier:
    path = classifier_path(Path(cache_dir).expanduser(), images, labels, recipe)
    classifier = new_classifier(images.shape[1], int(labels.max()) + 1, recipe)
    if path.is_file():
        classifier.load_state_dict(torch.load(path, weights_only=True))
        return classifier.eval()
    with one_thread():
        train_classifier(classifier, images, labels, recipe)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")  # renamed over: no reader sees half a file
    torch.save(classifier.state_dict(), tmp)
    os.replace(tmp, path)
    return classifier.eval()


@contextlib.contextmanager
def one_thread() -> Iterator[None]:
    """Trains on one CPU thread: the weights then do not depend on the machine's core count, and a few seconds
    of small convolutions run faster alone than split over busy cores (4 s against 20 s on 2 loaded ones)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def new_classifier(channels: int, classes: int, recipe: ClassifierRecipe) -> ImageClassifier:
    """Initial weights from the recipe's seed. The run's own random stream is left as it was: a run that
    finds the classifier cached draws the same numbers as one that trains it."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(recipe.seed)
        return ImageClassifier(channels, classes, recipe.width, recipe.features)


def train_classifier(
    classifier: ImageClassifier, images: torch.Tensor, labels: torch.Tensor, recipe: ClassifierRecipe
) -> None:
    """Adam with a one-cycle schedule on randomly shifted images, every draw from the recipe's seed."""
    draws = torch.Generator().manual_seed(recipe.seed)
    optimizer = torch.optim.Adam(classifier.parameters(), lr=recipe.lr)
    batches = -(-len(images) // recipe.batch_size)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, recipe.lr, total_steps=recipe.epochs * batches)
    max_shift = round(recipe.shift * images.shape[-1])
    classifier.train()
    for _ in range(recipe.epochs):
        for batch in torch.randperm(len(images), generator=draws).split(recipe.batch_size):
            shifted = random_shift(images[batch].float(), max_shift, draws)
            loss = F.cross_entropy(classifier.logits(shifted), labels[batch])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()


def random_shift(images: torch.Tensor, max_shift: int, draws: torch.Generator) -> torch.Tensor:
    """Each image moved by up to `max_shift` pixels along each axis, the border filled with black (-1)."""
    if max_shift == 0:
        return images
    m, (h, w) = max_shift, images.shape[-2:]
    padded = F.pad(images, (m, m, m, m), value=-1.0)
    offsets = torch.randint(0, 2 * m + 1, (len(images), 2), generator=draws).tolist()
    return torch.stack([padded[i, :, dy : dy + h, dx : dx + w] for i, (dy, dx) in enumerate(offsets)])
