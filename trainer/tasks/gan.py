"""DCGAN training (Radford et al., 2016): one discriminator step, then one generator step, per batch.

Read `training_step` top to bottom; everything else is bookkeeping: optimizers, a fixed-noise sample grid
every epoch, and validation scores in a small pixel space: the Fréchet distance between real and generated
images, which makes "best checkpoint" mean something, and the diversity of the samples, whose fall is mode
collapse.
"""

import math

import torch
import torch.nn.functional as F
from torch import nn

from trainer.data.evaluation import gather_by_key
from trainer.images import log_image_grid
from trainer.tasks.base import GANReport, Task, ValidationReport


class DCGAN(Task):
    def __init__(
        self,
        generator: nn.Module,
        discriminator: nn.Module,
        lr: float = 2e-4,
        beta1: float = 0.5,
        beta2: float = 0.999,
        num_samples: int = 64,
    ):
        super().__init__()
        self.save_hyperparameters(ignore=["generator", "discriminator"])
        self.automatic_optimization = False  # two optimizers, stepped in the GAN's own order
        self.generator = generator
        self.discriminator = discriminator
        self.latent_dim: int = generator.latent_dim
        # Fixed noise, part of the checkpoint, so sample grids are comparable across epochs and resumes.
        noise = torch.randn(num_samples, self.latent_dim, generator=torch.Generator().manual_seed(0))
        self.register_buffer("sample_noise", noise)
        self._val_features: dict[
            int, tuple[torch.Tensor, torch.Tensor]
        ] = {}  # image -> (real, fake) features

    def configure_optimizers(self) -> list[torch.optim.Optimizer]:
        betas = (self.hparams.beta1, self.hparams.beta2)
        opt_g = torch.optim.Adam(self.generator.parameters(), lr=self.hparams.lr, betas=betas)
        opt_d = torch.optim.Adam(self.discriminator.parameters(), lr=self.hparams.lr, betas=betas)
        return [opt_g, opt_d]

    def training_step(self, real: torch.Tensor, batch_idx: int) -> None:
        opt_g, opt_d = self.optimizers()
        z = torch.randn(real.shape[0], self.latent_dim, device=self.device)
        fake = self.generator(z)

        # 1. Discriminator: real images -> 1, generated images (detached, G is not trained here) -> 0.
        d_real = self.discriminator(real)
        d_fake = self.discriminator(fake.detach())
        loss_d = F.binary_cross_entropy_with_logits(d_real, torch.ones_like(d_real)) + (
            F.binary_cross_entropy_with_logits(d_fake, torch.zeros_like(d_fake))
        )
        opt_d.zero_grad(set_to_none=True)
        self.manual_backward(loss_d)
        opt_d.step()

        # 2. Generator, non-saturating loss: maximise log D(G(z)) rather than minimise log(1 - D(G(z))).
        d_fake_for_g = self.discriminator(fake)
        loss_g = F.binary_cross_entropy_with_logits(d_fake_for_g, torch.ones_like(d_fake_for_g))
        opt_g.zero_grad(set_to_none=True)
        self.manual_backward(loss_g)
        opt_g.step()

        # For the divergence guard (trainer/tasks/base.py), and the loggers on logging steps.
        self.report(
            GANReport(
                losses={"loss_d": loss_d, "loss_g": loss_g},
                D_x=d_real.sigmoid().mean(),
                D_G_z=d_fake.sigmoid().mean(),
            )
        )

    # -- validation: Fréchet distance of 8x8 pixel features, with noise fixed per validation image ------

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        index, real = batch
        noise = torch.stack(
            [torch.randn(self.latent_dim, generator=torch.Generator().manual_seed(i)) for i in index.tolist()]
        )
        fake = self.generator(noise.to(self.device))
        features = zip(index.tolist(), _pixel_features(real).cpu(), _pixel_features(fake).cpu())
        self._val_features.update({i: (r, f) for i, r, f in features})

    def on_validation_epoch_end(self) -> None:
        features = gather_by_key(self._val_features)  # every validation image once, whatever the world size
        self._val_features = {}
        real, fake = (torch.stack(part).double() for part in zip(*features.values()))
        diversity = sample_diversity(real, fake)
        self.log_dict(
            {"val/pixel_fd": frechet_distance(real, fake).float(), "val/sample_diversity": diversity},
            sync_dist=False,
        )
        self.report_validation(ValidationReport(sample_diversity=diversity))

    def on_train_epoch_end(self) -> None:
        was_training = self.generator.training
        self.generator.eval()
        with torch.no_grad():
            log_image_grid(self.trainer, "samples", self.generator(self.sample_noise))
        self.generator.train(was_training)


def _pixel_features(images: torch.Tensor) -> torch.Tensor:
    return F.adaptive_avg_pool2d(images.float(), 8).flatten(1)


def sample_diversity(real: torch.Tensor, fake: torch.Tensor) -> float:
    """Total variance of the generated features over that of the real ones: about 1 when the samples spread
    like the data, near 0 when the generator makes one image whatever its noise (mode collapse)."""
    return float(torch.cov(fake.T).trace() / torch.cov(real.T).trace())


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
