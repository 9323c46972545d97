"""DCGAN training (Radford et al., 2016): one discriminator step, then `generator_steps` generator steps (one
by default), per batch.

Read `training_step` top to bottom; everything else is bookkeeping: optimizers, a fixed-noise sample grid
every epoch, and validation scores. Each validation image gets one generated image from noise seeded by its
index and counts once at any world size, so a seed's scores repeat, and do not depend on the world size
beyond float rounding. The scores: FID and Inception Score through a small classifier of the training
images (trainer/metrics/image_quality.py), beside the real validation images' own (the floor of the FID, the
ceiling of the IS), which need data with classes; and in a small pixel space, the Fréchet distance and the
diversity of the samples, whose fall is mode collapse.
"""

import copy
import logging
from collections.abc import Mapping
from typing import ClassVar, Literal, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset

from trainer.config.ranges import FractionBelowOne, Positive, PositiveFloat
from trainer.data.evaluation import gather_by_key
from trainer.distributed.fsdp import whole_parameters
from trainer.errors import UserError
from trainer.metrics.image_quality import (
    ClassifierRecipe,
    Embedding,
    ImageQuality,
    frechet_distance,
    inception_score,
    load_or_train_classifier,
)
from trainer.models.dcgan import Generator
from trainer.reporting.image_grids import log_image_grid
from trainer.tasks.base import GANReport, Task, ValidationReport

log = logging.getLogger(__name__)

Loss = Literal["bce", "hinge"]

# The scores that need a classifier of the data's classes.
CLASSIFIER_METRICS = ("val/fid", "val/inception_score")


class ValidationItem(NamedTuple):
    """One validation image in pixel features, its generated counterpart's, and the classifier's view of that
    counterpart (None for data without classes)."""

    real_pixels: torch.Tensor
    fake_pixels: torch.Tensor
    fake_embedding: Embedding | None


class DCGAN(Task):
    validation_metrics: ClassVar[Mapping[str, str | None]] = {
        "val/fid": "min",
        "val/inception_score": "max",
        "val/fid_real_floor": None,  # the real data's own figures: the scale, not a score
        "val/inception_score_real_ceiling": None,
        "val/pixel_fd": "min",
        "val/sample_diversity": "max",
    }

    def __init__(
        self,
        generator: Generator,
        discriminator: nn.Module,
        lr: PositiveFloat = 2e-4,
        lr_d: PositiveFloat | None = None,  # the discriminator's (None: lr); unequal: TTUR (Heusel et al.)
        generator_steps: Positive = 1,  # generator updates per batch, after the discriminator's one
        beta1: FractionBelowOne = 0.5,
        beta2: FractionBelowOne = 0.999,
        num_samples: Positive = 64,
        ema_decay: FractionBelowOne = 0.0,  # samples from an average of the generator's weights (0: none)
        cache_dir: str = "~/.cache/trainer",  # where the classifier of the FID and IS is kept
        loss: Loss = "bce",  # the paper's binary cross-entropy, or the hinge loss (Lim & Ye; Miyato et al.)
    ):
        super().__init__()
        self.save_hyperparameters(ignore=["generator", "discriminator"])
        self.automatic_optimization = False  # two optimizers, stepped in the GAN's own order
        self.generator = generator
        self.discriminator = discriminator
        # Validation and sample grids draw from an exponential moving average of the generator's weights,
        # which smooths the swings of adversarial training (Yazici et al., 2019); trained by no optimizer.
        self.generator_ema = copy.deepcopy(generator).requires_grad_(False) if ema_decay else None
        self.latent_dim: int = generator.latent_dim
        # Fixed noise, part of the checkpoint, so sample grids are comparable across epochs and resumes.
        noise = torch.randn(num_samples, self.latent_dim, generator=torch.Generator().manual_seed(0))
        self.register_buffer("sample_noise", noise)
        self.quality: ImageQuality | None = None  # set up with the data; None for data without classes
        self._val_items: dict[int, ValidationItem] = {}  # validation image index -> its item
        self._ema_batchnorm_step = -1  # the step whose averaged weights the averaged BatchNorm fits

    def setup(self, stage: str) -> None:
        data = self.trainer.datamodule  # pyright: ignore[reportAttributeAccessIssue]  # set by Lightning
        if data is None or self.quality is not None:  # a divergence replay brings its one batch, no data
            return
        classes = getattr(data, "train_classes", None)
        if classes is None or len(set(classes)) < 2:
            self._without_classifier_metrics()
            return
        # Rank zero trains and caches the classifier first; the other ranks then read the same one.
        if self.trainer.is_global_zero:
            self.quality = quality_of(data.train_set, classes, data.val_set, self.hparams.cache_dir)
        self.trainer.strategy.barrier("dcgan image quality")
        if self.quality is None:
            self.quality = quality_of(data.train_set, classes, data.val_set, self.hparams.cache_dir)

    def _without_classifier_metrics(self) -> None:
        monitors = [getattr(c, "monitor", None) for c in self.trainer.checkpoint_callbacks]
        monitored = [m for m in monitors if m in CLASSIFIER_METRICS]
        if monitored:
            raise UserError(
                f"monitor.metric={monitored[0]} needs the images' classes to train its classifier, and the "
                "data has fewer than two (data=image_folder: one subfolder per class; data=hub: "
                "data.label_key): give it classes, or set monitor.metric=val/pixel_fd"
            )
        log.info(
            f"the data has fewer than two classes: no {' or '.join(CLASSIFIER_METRICS)}, which need them"
        )

    def configure_optimizers(self) -> list[torch.optim.Optimizer]:
        hp, fused = self.hparams, self.fused_optimizer
        betas = (hp.beta1, hp.beta2)
        opt_g = torch.optim.Adam(self.generator.parameters(), lr=hp.lr, betas=betas, fused=fused)
        lr_d = hp.lr if hp.lr_d is None else hp.lr_d
        opt_d = torch.optim.Adam(self.discriminator.parameters(), lr=lr_d, betas=betas, fused=fused)
        return [opt_g, opt_d]

    def training_step(self, real: torch.Tensor, batch_idx: int) -> None:
        optimizers = self.optimizers()
        assert isinstance(optimizers, list)  # (two: configure_optimizers)
        opt_g, opt_d = optimizers
        z = torch.randn(real.shape[0], self.latent_dim, device=self.device)
        fake = self.generator(z)

        # 1. Discriminator: real images -> "real", generated ones (detached: G is not trained here) -> "fake".
        d_real = self.discriminator(real)
        d_fake = self.discriminator(fake.detach())
        loss_d = discriminator_loss(d_real, d_fake, self.hparams.loss)
        opt_d.zero_grad(set_to_none=True)
        self.manual_backward(loss_d)
        opt_d.step()

        # 2. Generator: make D call its images real. `generator_steps` updates, each after the first on fresh
        # noise, keep up with a fast discriminator.
        for step in range(self.hparams.generator_steps):
            if step:
                fake = self.generator(torch.randn_like(z))
            loss_g = generator_loss(self.discriminator(fake), self.hparams.loss)
            opt_g.zero_grad(set_to_none=True)
            self.manual_backward(loss_g)
            opt_g.step()
        if self.generator_ema is not None:
            self.update_generator_ema()

        # For the divergence guard (trainer/tasks/base.py), and the loggers on logging steps. The hinge
        # generator loss, -D(G(z)), takes any sign: a signal, not a loss watched for multiplicative spikes.
        losses = {"loss_d": loss_d, "loss_g": loss_g}
        signed = {"loss_g": losses.pop("loss_g")} if self.hparams.loss == "hinge" else {}
        self.report(GANReport(losses, signed, D_x=d_real.sigmoid().mean(), D_G_z=d_fake.sigmoid().mean()))

    @torch.no_grad()
    def update_generator_ema(self) -> None:
        updates = self.global_step // (1 + self.hparams.generator_steps)  # the optimizer steps of a batch
        decay = averaging_decay(self.hparams.ema_decay, updates)
        assert self.generator_ema is not None  # (called only with ema_decay > 0)
        with whole_parameters(self.trainer, self.generator):
            for average, current in zip(self.generator_ema.parameters(), self.generator.parameters()):
                average.lerp_(current, 1 - decay)

    @torch.no_grad()
    def fit_ema_batchnorm(self, batches: int = 8, batch_size: int = 64) -> None:
        """Measures the averaged generator's BatchNorm statistics on its own activations, from noise fixed
        by seed (the same on every rank): the live generator's statistics do not fit the averaged weights, and
        while the two differ they ruin its samples (precise BatchNorm, Wu & Johnson, 2021)."""
        if self.generator_ema is None or self._ema_batchnorm_step == self.global_step:
            return  # (validation and the sample grid both ask at the end of an epoch)
        self._ema_batchnorm_step = self.global_step
        norms = [m for m in self.generator_ema.modules() if isinstance(m, nn.BatchNorm2d)]
        momenta = [m.momentum for m in norms]
        for norm in norms:
            norm.reset_running_stats()
            norm.momentum = None  # a plain average over the batches below
        was_training = self.generator_ema.training
        self.generator_ema.train()
        noise = torch.Generator().manual_seed(0)
        for _ in range(batches):
            self.generator_ema(torch.randn(batch_size, self.latent_dim, generator=noise).to(self.device))
        self.generator_ema.train(was_training)
        for norm, momentum in zip(norms, momenta):
            norm.momentum = momentum

    @property
    def sampler(self) -> nn.Module:
        """The generator that validation and the sample grids draw from."""
        return self.generator if self.generator_ema is None else self.generator_ema

    # -- validation: generated images from noise fixed per validation image ------------------------------

    def on_validation_epoch_start(self) -> None:
        self.fit_ema_batchnorm()

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        index, real = batch
        noise = torch.stack(
            [torch.randn(self.latent_dim, generator=torch.Generator().manual_seed(i)) for i in index.tolist()]
        )
        fake = self.sampler(noise.to(self.device)).float().cpu()
        embedding = self.quality.embed(fake) if self.quality is not None else None
        real_pixels, fake_pixels = _pixel_features(real).cpu(), _pixel_features(fake)
        for row, i in enumerate(index.tolist()):
            row_embedding = embedding[row] if embedding is not None else None
            self._val_items[i] = ValidationItem(real_pixels[row], fake_pixels[row], row_embedding)

    def on_validation_epoch_end(self) -> None:
        by_index = gather_by_key(self._val_items)  # every validation image once, whatever the world size
        self._val_items = {}
        items = [by_index[i] for i in sorted(by_index)]  # one order at any world size: the same float sums
        real, fake = (
            torch.stack(part).double() for part in zip(*[(i.real_pixels, i.fake_pixels) for i in items])
        )
        diversity = sample_diversity(real, fake)
        metrics = {"val/pixel_fd": float(frechet_distance(real, fake)), "val/sample_diversity": diversity}
        if self.quality is not None:
            embeddings = [i.fake_embedding for i in items if i.fake_embedding is not None]
            metrics |= classifier_scores(self.quality, Embedding.stack(embeddings))
        self.log_dict(metrics, sync_dist=False)
        self.report_validation(ValidationReport(sample_diversity=diversity))

    def on_train_epoch_end(self) -> None:
        self.fit_ema_batchnorm()
        sampler = self.sampler
        was_training = sampler.training
        sampler.eval()
        with torch.no_grad():
            log_image_grid(self.trainer, "samples", sampler(self.sample_noise))
        sampler.train(was_training)


def averaging_decay(decay: float, updates: int) -> float:
    """The plain mean of the weights so far, until that remembers more than `decay` does: the random initial
    weights are soon outweighed, and even a short run averages at its `decay` soon after it starts."""
    return min(decay, (1 + updates) / (2 + updates))


def discriminator_loss(d_real: torch.Tensor, d_fake: torch.Tensor, loss: Loss) -> torch.Tensor:
    """On D's logits. bce: real -> 1, fake -> 0. hinge: real logits above 1, fake below -1, and no pull
    beyond those margins, so D stops pushing images it already separates."""
    if loss == "hinge":
        return F.relu(1 - d_real).mean() + F.relu(1 + d_fake).mean()
    real = F.binary_cross_entropy_with_logits(d_real, torch.ones_like(d_real))
    return real + F.binary_cross_entropy_with_logits(d_fake, torch.zeros_like(d_fake))


def generator_loss(d_fake: torch.Tensor, loss: Loss) -> torch.Tensor:
    """bce: the non-saturating loss, maximise log D(G(z)) rather than minimise log(1 - D(G(z))). hinge: raise
    D's logits of generated images."""
    if loss == "hinge":
        return -d_fake.mean()
    return F.binary_cross_entropy_with_logits(d_fake, torch.ones_like(d_fake))


def _pixel_features(images: torch.Tensor) -> torch.Tensor:
    return F.adaptive_avg_pool2d(images.float(), 8).flatten(1)


def sample_diversity(real: torch.Tensor, fake: torch.Tensor) -> float:
    """Total variance of the generated features over that of the real ones: about 1 when the samples spread
    like the data, near 0 when the generator makes one image whatever its noise (mode collapse)."""
    return float(torch.cov(fake.T).trace() / torch.cov(real.T).trace())


def quality_of(
    train_set: Dataset, train_classes: list[int], val_set: Dataset, cache_dir: str
) -> ImageQuality:
    train_images = _stacked(train_set)
    classifier = load_or_train_classifier(
        cache_dir, train_images, torch.tensor(train_classes), ClassifierRecipe()
    )
    return ImageQuality(classifier, train_images, _stacked(val_set))


def classifier_scores(quality: ImageQuality, samples: Embedding) -> dict[str, float]:
    return {
        "val/fid": quality.fid(samples),
        "val/inception_score": inception_score(samples.log_probs),
        "val/fid_real_floor": quality.fid_floor,
        "val/inception_score_real_ceiling": quality.inception_score_ceiling,
    }


def _stacked(images: Dataset) -> torch.Tensor:
    return torch.stack([images[i] for i in range(len(images))])  # type: ignore[arg-type]
