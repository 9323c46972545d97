"""The DCGAN's FID and Inception Score (trainer/metrics/image_quality.py): known cases against the real
data's own figures, the reference FID implementation, the cached classifier, and the scores of a run."""

import json
from functools import partial
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from helpers import TINY_DCGAN, compose_config, run_cli
from torchmetrics.image.fid import FrechetInceptionDistance

from trainer.data.images import DigitsDataModule
from trainer.errors import UserError
from trainer.metrics import image_quality
from trainer.metrics.gradients import layer_name, layers_of
from trainer.metrics.image_quality import ClassifierRecipe, ImageQuality, inception_score
from trainer.models.dcgan import Discriminator, Generator
from trainer.tasks.base import GANReport
from trainer.tasks.gan import CLASSIFIER_METRICS, DCGAN, averaging_decay, quality_of

SIZE = 16  # the tiny runs' image size: the classifier trains in a second or two
QUICK = ClassifierRecipe(epochs=1)  # for the tests of caching, where accuracy does not matter


@pytest.fixture(scope="module")
def digits() -> DigitsDataModule:
    data = DigitsDataModule(image_size=SIZE, seed=0)
    data.setup("fit")
    return data


@pytest.fixture(scope="module")
def quality(digits: DigitsDataModule, tmp_path_factory: pytest.TempPathFactory) -> ImageQuality:
    cache = tmp_path_factory.mktemp("cache")
    return quality_of(digits.train_set, digits.train_classes, digits.val_set, str(cache))


def images_of(data: DigitsDataModule, digit: int | None = None) -> torch.Tensor:
    """The training images (of one digit only, if given)."""
    keep = [i for i, c in enumerate(data.train_classes) if digit is None or c == digit]
    return torch.stack([data.train_set[i] for i in keep])


def scores(quality: ImageQuality, images: torch.Tensor) -> tuple[float, float]:
    embedding = quality.embed(images)
    return quality.fid(embedding), inception_score(embedding.log_probs)


def test_real_images_score_about_the_real_floor_and_ceiling(
    quality: ImageQuality, digits: DigitsDataModule
) -> None:
    """As many real images as the validation set has, drawn from the training set: a generator that
    reproduced the data would score so."""
    real = images_of(digits)[
        torch.randperm(len(digits.train_set), generator=torch.Generator().manual_seed(0))
    ]
    fid, score = scores(quality, real[: len(digits.val_set)])
    assert 0.5 * quality.fid_floor < fid < 2 * quality.fid_floor
    assert score > 0.85 * quality.inception_score_ceiling
    assert quality.inception_score_ceiling > 7  # ten digits, each recognised: at most 10


def test_noise_scores_far_worse_than_the_floor(quality: ImageQuality, digits: DigitsDataModule) -> None:
    noise = torch.rand(len(digits.val_set), 1, SIZE, SIZE, generator=torch.Generator().manual_seed(0)) * 2 - 1
    fid, score = scores(quality, noise)
    assert fid > 20 * quality.fid_floor
    assert score < 2


def test_a_generator_of_one_digit_has_an_inception_score_near_one(
    quality: ImageQuality, digits: DigitsDataModule
) -> None:
    fid, score = scores(quality, images_of(digits, digit=3))
    assert score < 1.5 < quality.inception_score_ceiling / 4
    assert fid > 10 * quality.fid_floor


def test_inception_score_of_known_distributions() -> None:
    confident_and_even = torch.eye(4).repeat(3, 1).clamp(min=1e-12).log()
    assert inception_score(confident_and_even) == pytest.approx(4, rel=1e-9)
    all_alike = torch.tensor([[0.7, 0.2, 0.1]] * 5).log()
    assert inception_score(all_alike) == pytest.approx(1, rel=1e-12)


def test_fid_equals_torchmetrics_on_the_same_features(
    quality: ImageQuality, digits: DigitsDataModule
) -> None:
    """torchmetrics' FID with the classifier as its feature extractor (its float32 result: 1e-6)."""
    train = images_of(digits)
    for generated in (images_of(digits, digit=7), torch.stack([digits.val_set[i] for i in range(50)]) * 0.5):
        reference = FrechetInceptionDistance(feature=quality.classifier)
        reference.update(train, real=True)
        reference.update(generated, real=False)
        assert quality.fid(quality.embed(generated)) == pytest.approx(float(reference.compute()), rel=1e-5)


def test_the_classifier_is_trained_once_then_read_from_its_cache(
    digits: DigitsDataModule, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    images, labels = images_of(digits), torch.tensor(digits.train_classes)
    trainings = []
    train = image_quality.train_classifier
    monkeypatch.setattr(image_quality, "train_classifier", lambda *a: trainings.append(1) or train(*a))
    first = image_quality.load_or_train_classifier(tmp_path, images, labels, QUICK)
    second = image_quality.load_or_train_classifier(tmp_path, images, labels, QUICK)
    assert len(trainings) == 1
    assert [p.name for p in tmp_path.iterdir()] == [
        image_quality.classifier_path(tmp_path, images, labels, QUICK).name
    ]
    assert all(torch.equal(a, b) for a, b in zip(first.state_dict().values(), second.state_dict().values()))


def test_the_cache_name_changes_with_the_recipe_and_the_data(
    digits: DigitsDataModule, tmp_path: Path
) -> None:
    images, labels = images_of(digits), torch.tensor(digits.train_classes)
    name = image_quality.classifier_path(tmp_path, images, labels, QUICK)
    assert image_quality.classifier_path(tmp_path, images, labels, ClassifierRecipe(epochs=2)) != name
    assert (
        image_quality.classifier_path(tmp_path, images, labels, ClassifierRecipe(epochs=1, width=8)) != name
    )
    assert image_quality.classifier_path(tmp_path, images[1:], labels[1:], QUICK) != name
    assert image_quality.classifier_path(tmp_path, images, labels.roll(1), QUICK) != name
    assert image_quality.classifier_path(tmp_path, images, labels, ClassifierRecipe(epochs=1)) == name


def test_training_is_deterministic_and_leaves_the_run_random_stream_alone(
    digits: DigitsDataModule, tmp_path: Path
) -> None:
    images, labels = images_of(digits), torch.tensor(digits.train_classes)
    torch.manual_seed(123)
    before = torch.get_rng_state()
    first = image_quality.load_or_train_classifier(tmp_path / "a", images, labels, QUICK)
    assert torch.equal(torch.get_rng_state(), before)
    second = image_quality.load_or_train_classifier(tmp_path / "b", images, labels, QUICK)
    assert all(torch.equal(a, b) for a, b in zip(first.state_dict().values(), second.state_dict().values()))


def validation_scores(task: DCGAN, batches: list[list[int]], digits: DigitsDataModule) -> dict[str, float]:
    """The task's validation over `batches` of validation image indices, as a rank's loader would give."""
    logged: dict[str, float] = {}
    task.log_dict = lambda metrics, **kwargs: logged.update(metrics)  # no trainer to log to
    with torch.no_grad():
        for batch_idx, indices in enumerate(batches):
            images = torch.stack([digits.val_set[i] for i in indices])
            task.validation_step((torch.tensor(indices), images), batch_idx)
        task.on_validation_epoch_end()
    return logged


def test_every_validation_image_counts_once_whatever_the_split(
    quality: ImageQuality, digits: DigitsDataModule
) -> None:
    """One rank's batches in order, or two ranks' shares in other batch sizes that repeat items (as the
    last ranks' shares do, trainer/data/evaluation.py): the same scores (to float32 rounding: convolutions
    of batches of other sizes round otherwise in the last bits)."""
    task = DCGAN(Generator(100, SIZE, 1, 8), Discriminator(SIZE, 1, 8)).eval()
    task.quality = quality
    indices = list(range(len(digits.val_set)))
    one_rank = validation_scores(task, [indices[i : i + 16] for i in range(0, len(indices), 16)], digits)
    shares = [indices[0::2], indices[1::2] + indices[:3]]
    two_ranks = validation_scores(task, [s[i : i + 7] for s in shares for i in range(0, len(s), 7)], digits)
    assert one_rank == pytest.approx(two_ranks, rel=1e-6)
    assert set(CLASSIFIER_METRICS) | {"val/fid_real_floor", "val/inception_score_real_ceiling"} <= set(
        one_rank
    )
    assert one_rank["val/fid"] > one_rank["val/fid_real_floor"]  # an untrained generator


def test_samples_come_from_an_average_of_the_generator_weights(tmp_path: Path) -> None:
    from trainer.run import train

    cfg = compose_config(
        *TINY_DCGAN, "logger=none", "++trainer.max_epochs=1", "task.ema_decay=0.9", run_dir=tmp_path
    )
    train(cfg)
    state = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=True)
    weights = state["state_dict"]
    live, average = weights["generator.net.0.weight"], weights["generator_ema.net.0.weight"]
    assert not torch.equal(live, average) and torch.allclose(live, average, atol=0.05)
    (generator_group,) = state["optimizer_states"][0]["param_groups"]  # no optimizer trains the average
    assert len(generator_group["params"]) == len(list(Generator(100, SIZE, 1, 8).parameters()))


def test_data_without_classes_cannot_be_monitored_by_fid(tmp_path: Path) -> None:
    from PIL import Image

    from trainer.run import train

    folder = tmp_path / "images"
    folder.mkdir()
    for i in range(40):
        Image.new("L", (20, 20), i * 6).save(folder / f"{i:02d}.png")
    cfg = compose_config(
        *TINY_DCGAN, "logger=none", "data=image_folder", f"data.root={folder}", run_dir=tmp_path / "run"
    )
    with pytest.raises(
        UserError,
        match=r"monitor.metric=val/fid needs the images' classes .* set monitor.metric=val/pixel_fd$",
    ):
        train(cfg)


@pytest.mark.slow
def test_a_tiny_run_reports_fid_and_inception_score(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    done = run_cli(
        *TINY_DCGAN, "logger=none", "++trainer.max_epochs=2", f"hydra.run.dir={run_dir}", home=tmp_path
    )
    assert done.returncode == 0, done.stderr[-3000:]
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["val/fid"]["mode"] == "min" and metrics["val/inception_score"]["mode"] == "max"
    assert (
        metrics["val/fid_real_floor"]["mode"] is None
        and metrics["val/inception_score_real_ceiling"]["mode"] is None
    )
    assert 0 < metrics["val/fid_real_floor"]["final"] < metrics["val/fid"]["best"]
    assert 1 <= metrics["val/inception_score"]["best"] <= 10
    summary = (run_dir / "summary.txt").read_text()
    assert "val/fid (monitored)  " in summary
    for name in ("val/inception_score ", "val/fid_real_floor ", "val/inception_score_real_ceiling "):
        assert name in summary
    assert list((run_dir / "checkpoints").glob("best-*.ckpt"))


class ConstantLogit(torch.nn.Module):
    """A discriminator that says the same logit of every image, to read the loss's targets from."""

    def __init__(self, logit: float):
        super().__init__()
        self.logit = torch.nn.Parameter(torch.tensor(logit))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.logit.expand(images.shape[0])


def one_training_step(task: DCGAN) -> tuple[list[str], list[GANReport]]:
    """The task's training step on a batch of black images, without a trainer: which optimizers stepped, in
    order, and what it reported."""
    opt_g, opt_d = task.configure_optimizers()
    steps, reports = [], []
    for name, optimizer in (("g", opt_g), ("d", opt_d)):
        optimizer.step = partial(
            lambda name, step, *a, **k: steps.append(name) or step(*a, **k), name, optimizer.step
        )
    task.optimizers = lambda: [opt_g, opt_d]
    task.manual_backward = lambda loss: loss.backward()
    task.report = reports.append
    task.training_step(torch.full((4, 1, SIZE, SIZE), -1.0), 0)
    return steps, reports


def test_the_discriminator_has_its_own_learning_rate() -> None:
    """TTUR: lr_d; the losses' targets stay 1 for real images and 0 for generated ones."""
    logit = 5.0
    task = DCGAN(Generator(100, SIZE, 1, 8), ConstantLogit(logit), lr=2e-4, lr_d=1e-4)
    opt_g, opt_d = task.configure_optimizers()
    assert [opt_g.param_groups[0]["lr"], opt_d.param_groups[0]["lr"]] == [2e-4, 1e-4]
    _, (report,) = one_training_step(task)
    softplus = float(F.softplus(torch.tensor(logit)))
    real_loss, fake_loss = softplus - logit, softplus  # BCE with logits at targets 1 and 0
    assert report.losses["loss_d"].item() == pytest.approx(real_loss + fake_loss, rel=1e-6)


def test_the_generator_takes_generator_steps_per_batch() -> None:
    task = DCGAN(Generator(100, SIZE, 1, 8), Discriminator(SIZE, 1, 8), generator_steps=3)
    steps, _ = one_training_step(task)
    assert steps == ["d", "g", "g", "g"]
    steps, _ = one_training_step(DCGAN(Generator(100, SIZE, 1, 8), Discriminator(SIZE, 1, 8)))
    assert steps == ["d", "g"]


def test_the_averaged_generator_normalizes_by_its_own_statistics() -> None:
    """Its BatchNorm statistics are measured on its own activations, not the live generator's, whose
    weights differ (here three times larger: nine times the variance)."""
    task = DCGAN(Generator(100, SIZE, 1, 8), Discriminator(SIZE, 1, 8), ema_decay=0.9)
    ema = task.generator_ema
    assert ema is not None
    with torch.no_grad():
        for weight in ema.parameters():
            weight.mul_(3)
        task.fit_ema_batchnorm()
        z = torch.randn(1024, 100, 1, 1, generator=torch.Generator().manual_seed(1))
        activations = ema.net[0](z).transpose(0, 1).flatten(1)  # the first BatchNorm's input, per channel
    first_norm = ema.net[1]
    assert torch.allclose(first_norm.running_var, activations.var(1), rtol=0.25)
    assert torch.allclose(first_norm.running_mean, activations.mean(1), atol=0.1 * activations.std())
    assert ema.training is task.generator.training  # left as it was


@pytest.mark.parametrize("logit", [-2.5, 0.5, 3.0])
def test_the_hinge_loss_pulls_logits_to_their_margins_only(logit: float) -> None:
    """D: max(0, 1 - D(x)) + max(0, 1 + D(G(z))), nothing beyond the margins; G: -D(G(z)), a signed number
    that the guard reads as a signal, not a loss whose spikes it watches."""
    task = DCGAN(Generator(100, SIZE, 1, 8), ConstantLogit(logit), loss="hinge")
    _, (report,) = one_training_step(task)
    assert report.losses["loss_d"].item() == pytest.approx(max(0, 1 - logit) + max(0, 1 + logit))
    assert list(report.losses) == ["loss_d"]
    assert report.signals["loss_g"].item() == pytest.approx(-logit, abs=1e-3)  # after D's one step of 2e-4


def test_a_spectrally_normalised_discriminator_has_convolutions_of_gain_one() -> None:
    """Each convolution's weight, as a matrix, ends with largest singular value 1 (the power iteration runs
    once per forward pass in training), and no BatchNorm is left."""
    discriminator = Discriminator(SIZE, 1, 8, norm="spectral")
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in discriminator.modules())
    convolutions = [m for m in discriminator.modules() if isinstance(m, torch.nn.Conv2d)]
    with torch.no_grad():
        for _ in range(30):
            discriminator(torch.randn(4, 1, SIZE, SIZE))
        gains = [torch.linalg.matrix_norm(c.weight.flatten(1), ord=2).item() for c in convolutions]
    assert gains == pytest.approx([1.0] * len(convolutions), abs=0.02)
    plain = Discriminator(SIZE, 1, 8).net[0]  # DCGAN's N(0, 0.02) initial weights, unnormalised
    assert torch.linalg.matrix_norm(plain.weight.flatten(1), ord=2).item() < 0.5


def test_the_average_of_weights_is_their_plain_mean_until_the_decay_takes_over() -> None:
    """Averaged with weights 1/2, 1/3, ... (the mean of every state so far: the random initial one is soon
    outweighed) until that remembers more than the decay does; from then on, the decay."""
    assert [averaging_decay(0.75, updates) for updates in range(5)] == pytest.approx(
        [1 / 2, 2 / 3, 0.75, 0.75, 0.75]
    )
    states = torch.arange(4.0)  # the initial state, then one per update
    average = states[0].clone()
    for updates, state in enumerate(states[1:]):
        average.lerp_(state, 1 - averaging_decay(0.99, updates))
        assert average.item() == pytest.approx(states[: updates + 2].mean().item())


def test_a_spectrally_normalised_layer_is_one_layer_to_the_guard_and_replay() -> None:
    """Its weight lives in a parametrization submodule; the layer is still the convolution, by its name."""
    discriminator = Discriminator(SIZE, 1, 8, norm="spectral")
    convolutions = {name for name, m in discriminator.named_modules() if isinstance(m, torch.nn.Conv2d)}
    layers = layers_of(discriminator)
    assert convolutions <= layers.keys() and not any("parametrizations" in name for name in layers)
    assert {layer_name(name) for name, _ in discriminator.named_parameters()} == convolutions
