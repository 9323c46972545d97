"""The debug presets, the GPU switches on CPU, and the data sources other than the embedded digits."""

import json
import math
import os
from pathlib import Path

import pytest
import torch
from helpers import TINY_DCGAN, compose_config, run_cli
from PIL import Image

from trainer.run import train

FAST = [*TINY_DCGAN, "logger=none"]


@pytest.mark.parametrize("preset", ["fdr", "overfit", "limit", "profiler"])
def test_debug_presets_run(preset: str, tmp_path: Path) -> None:
    extra = ["++trainer.max_epochs=3", "++trainer.check_val_every_n_epoch=1"] if preset == "overfit" else []
    if preset == "profiler":
        extra = ["++trainer.limit_train_batches=3"]
    metrics = train(compose_config(*FAST, f"debug={preset}", *extra, run_dir=tmp_path))
    if preset == "fdr":  # one batch of each, nothing written
        assert metrics["val/pixel_fd"]["final"] > 0 and not (tmp_path / "checkpoints").exists()
    if preset == "profiler":
        assert list(tmp_path.glob("*profile*.txt"))
    if preset in ("overfit", "limit"):
        assert (tmp_path / "checkpoints" / "last.ckpt").is_file()


@pytest.mark.slow
def test_gpu_switches_run_on_cpu_and_keep_checkpoints_portable(tmp_path: Path, home: Path) -> None:
    """bf16 autocast + torch.compile + channels_last, then a plain fp32 run resumes from that checkpoint."""
    run_dir = tmp_path / "run"
    gpu_paths = ["++trainer.precision=bf16-mixed", "perf.compile=true", "perf.channels_last=true"]
    result = run_cli(*FAST, *gpu_paths, "++trainer.max_epochs=1", f"hydra.run.dir={run_dir}", home=home)
    assert result.returncode == 0, result.stderr[-3000:]
    names = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"].keys()
    assert "generator.net.0.weight" in names and not any("_orig_mod" in n for n in names)
    resumed = run_cli(*FAST, "++trainer.max_epochs=2", f"hydra.run.dir={run_dir}", home=home)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 16


def write_images(folder: Path, count: int) -> None:
    folder.mkdir(parents=True)
    for i in range(count):
        pixels = torch.randint(
            0, 255, (24, 30, 3), generator=torch.Generator().manual_seed(i), dtype=torch.uint8
        )
        Image.fromarray(pixels.numpy()).save(folder / f"{i:03d}.{'png' if i % 2 else 'jpg'}")


def test_image_folder_images_are_resized_cropped_and_scaled(tmp_path: Path) -> None:
    write_images(tmp_path / "images" / "nested", 20)
    cfg = compose_config(
        *FAST,
        "data=image_folder",
        f"data.root={tmp_path / 'images'}",
        "data.batch_size=4",
        run_dir=tmp_path / "run",
    )
    from trainer.config.build import build

    data = build(cfg.data, "data")
    data.setup("fit")
    batch = next(iter(data.train_dataloader()))
    assert batch.shape == (4, 3, 16, 16) and batch.min() >= -1 and batch.max() <= 1
    assert len(data.train_set) + len(data.val_set) == 20


def test_hub_loader_through_the_datasets_library_offline(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """data=hub goes through `datasets.load_dataset`; its local imagefolder builder needs no network."""
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    write_images(tmp_path / "hub" / "train", 24)
    cfg = compose_config(
        *FAST,
        "data=hub",
        "data.name=imagefolder",
        f"data.data_dir={tmp_path / 'hub'}",
        "data.image_key=image",
        "data.batch_size=4",
        "++trainer.max_epochs=1",
        "monitor.metric=val/pixel_fd",  # no label_key, no classes: no classifier for val/fid
        run_dir=tmp_path / "run",
    )
    metrics = train(cfg)
    assert "train/loss_d" in metrics
    assert math.isfinite(json.loads((tmp_path / "run" / "metrics.json").read_text())["train/loss_g"]["final"])


def test_hub_loader_names_a_missing_column(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from trainer.config.build import build
    from trainer.errors import UserError

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    write_images(tmp_path / "hub" / "train", 4)
    cfg = compose_config(
        *FAST,
        "data=hub",
        "data.name=imagefolder",
        f"data.data_dir={tmp_path / 'hub'}",
        "data.image_key=img",
        run_dir=tmp_path / "run",
    )
    with pytest.raises(UserError, match=r"no column 'img'; set data.image_key to one of \['image'\]"):
        build(cfg.data, "data").setup("fit")


def test_wandb_goes_online_only_with_a_key(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from trainer.reporting.loggers import resolve_wandb_mode

    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    assert resolve_wandb_mode("auto") == "offline"
    (tmp_path / ".netrc").write_text("machine api.wandb.ai\n  login user\n  password abc\n")
    os.chmod(tmp_path / ".netrc", 0o600)
    assert resolve_wandb_mode("auto") == "online"
    monkeypatch.setenv("WANDB_MODE", "disabled")
    assert resolve_wandb_mode("auto") == "disabled"
    assert resolve_wandb_mode("offline") == "offline"
