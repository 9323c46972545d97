"""Pieces on their own: DCGAN shapes, the Fréchet distance, the resumable loader, per-layer gradient norms."""

import numpy as np
import pytest
import scipy.linalg
import torch

from trainer.data.loading import ResumableLoader
from trainer.metrics.gradients import layer_name, per_layer_norms
from trainer.metrics.image_quality import frechet_distance
from trainer.models.dcgan import Discriminator, Generator


@pytest.mark.parametrize("size,channels", [(8, 1), (16, 3), (32, 1), (64, 3)])
def test_dcgan_shapes(size: int, channels: int) -> None:
    g, d = Generator(16, size, channels, width=4), Discriminator(size, channels, width=4)
    images = g(torch.randn(5, 16))
    assert images.shape == (5, channels, size, size)
    assert images.min() >= -1 and images.max() <= 1  # tanh output, like the data
    assert d(images).shape == (5,)


def test_dcgan_refuses_sizes_that_are_not_powers_of_two() -> None:
    with pytest.raises(ValueError, match="power of two"):
        Generator(image_size=48)


def test_dcgan_init_follows_the_paper() -> None:
    weights = torch.cat(
        [
            m.weight.flatten()
            for m in Generator(100, 64, 3).modules()
            if isinstance(m, torch.nn.ConvTranspose2d)
        ]
    )
    assert abs(weights.mean().item()) < 1e-3 and abs(weights.std().item() - 0.02) < 1e-3


def test_frechet_distance_matches_scipy() -> None:
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(400, 6)), rng.normal(loc=0.5, scale=1.5, size=(300, 6)) @ rng.normal(size=(6, 6))
    mu_x, mu_y, cx, cy = x.mean(0), y.mean(0), np.cov(x.T), np.cov(y.T)
    expected = ((mu_x - mu_y) ** 2).sum() + np.trace(cx + cy - 2 * scipy.linalg.sqrtm(cx @ cy).real)
    got = frechet_distance(torch.from_numpy(x), torch.from_numpy(y)).item()
    assert got == pytest.approx(expected, rel=1e-6)
    assert frechet_distance(torch.from_numpy(x), torch.from_numpy(x)).item() == pytest.approx(0, abs=1e-8)


def test_loader_order_depends_only_on_seed_and_epoch() -> None:
    data = torch.arange(20)
    loader = ResumableLoader(data, batch_size=4, seed=1)
    loader.sampler.set_epoch(0)
    first = torch.cat(list(loader))
    torch.manual_seed(123)  # the global RNG plays no part
    again = torch.cat(list(loader))
    loader.sampler.set_epoch(1)
    other_epoch = torch.cat(list(loader))
    assert torch.equal(first, again) and not torch.equal(first, other_epoch)
    assert sorted(first.tolist()) == list(range(20))


def test_loader_resumes_mid_epoch_with_the_unseen_batches() -> None:
    data = torch.arange(24)
    loader = ResumableLoader(data, batch_size=4, seed=3)
    loader.sampler.set_epoch(2)
    batches = list(loader)
    it = iter(loader)
    next(it), next(it)
    state = loader.state_dict()
    assert state == {"epoch": 2, "batches_yielded": 2}

    fresh = ResumableLoader(data, batch_size=4, seed=3)
    fresh.load_state_dict(state)
    fresh.sampler.set_epoch(2)  # Lightning sets the epoch before iterating
    rest = list(fresh)
    assert [b.tolist() for b in rest] == [b.tolist() for b in batches[2:]]
    assert len(list(fresh)) == 6  # the skip applies once; the next epoch is whole


def test_item_seeds_depend_on_seed_epoch_and_item_and_survive_a_mid_epoch_resume() -> None:
    def keys(loader: ResumableLoader) -> list[tuple[int, int]]:
        return [(int(i), int(s)) for indices, seeds in loader for i, s in zip(indices, seeds, strict=True)]

    data = KeyEcho(24)
    loader = ResumableLoader(data, batch_size=4, seed=7, item_seeds=True)
    first = keys(loader)
    assert keys(loader) == first and len({s for _, s in first}) == 24
    loader.sampler.set_epoch(1)
    seed_of = dict(first)
    assert all(seed_of[i] != s for i, s in keys(loader))  # each item draws anew in each epoch
    loader.sampler.set_epoch(0)
    it = iter(loader)
    next(it), next(it)
    resumed = ResumableLoader(data, batch_size=4, seed=7, item_seeds=True)
    resumed.load_state_dict(loader.state_dict())
    assert keys(resumed) == first[8:]
    other_seed = ResumableLoader(data, batch_size=4, seed=8, item_seeds=True)
    assert not set(seed_of.values()) & {s for _, s in keys(other_seed)}


class KeyEcho(torch.utils.data.Dataset):
    """Returns the key it is asked for: (index, seed) from a sampler with item seeds."""

    def __init__(self, size: int):
        self.size = size

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, key: tuple[int, int]) -> tuple[int, int]:
        return key


def test_loader_ignores_a_finished_epoch() -> None:
    loader = ResumableLoader(torch.arange(8), batch_size=4, seed=0)
    loader.load_state_dict({"epoch": 0, "batches_yielded": 2})
    assert len(list(loader)) == 2


def test_per_layer_norms_equal_the_norms_of_each_layers_tensors() -> None:
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.ReLU(), torch.nn.Linear(4, 2))
    model(torch.randn(8, 3)).square().sum().backward()
    grads = [p.grad for p in model.parameters()]  # weight and bias of layer 0, then of layer 2
    norms = per_layer_norms(grads, torch.tensor([0, 0, 1, 1]), 2).tolist()
    for position, index in enumerate((0, 2)):
        expected = (
            torch.cat([model[index].weight.grad.flatten(), model[index].bias.grad.flatten()]).norm().item()
        )
        assert norms[position] == pytest.approx(expected, rel=1e-6)
    total = torch.cat([g.flatten() for g in grads]).norm().item()
    assert norms[2] == pytest.approx(total, rel=1e-6)
    assert layer_name("generator.net.3.weight") == "generator.net.3"


def test_shards_are_disjoint_and_equal_in_size(monkeypatch: pytest.MonkeyPatch) -> None:
    import trainer.data.loading as loading

    seen = []
    for rank in range(3):
        monkeypatch.setattr(loading, "rank_and_world", lambda rank=rank: (rank, 3))
        sampler = loading.ShardedSampler(20, seed=5)
        shard = list(sampler)
        assert len(shard) == len(sampler) == 6
        seen.append(set(shard))
    assert not (seen[0] & seen[1] or seen[0] & seen[2] or seen[1] & seen[2])
