"""The offline-run reader (tests/wandb_offline.py) against real wandb offline runs."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from wandb_offline import OfflineRun, WandbLogError, find_runs, read_run

wandb = pytest.importorskip("wandb")
torch = pytest.importorskip("torch")

BIG_TEXT = "x" * 100_000  # one record of ~100 KB: spans 32 KiB blocks as first/middle/last chunks


@pytest.fixture(scope="module")
def wandb_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A ``wandb/`` dir with one offline run and its offline resume (same id, second folder)."""
    root = tmp_path_factory.mktemp("wandb_offline")
    with pytest.MonkeyPatch.context() as mp:
        for var, value in {
            "WANDB_MODE": "offline",
            "WANDB_SILENT": "true",
            "WANDB_ERROR_REPORTING": "false",
            "WANDB_DIR": str(root),
            "WANDB_CONFIG_DIR": str(root / "config"),
            "WANDB_CACHE_DIR": str(root / "cache"),
            "WANDB_DATA_DIR": str(root / "data"),
        }.items():
            mp.setenv(var, value)
        settings = wandb.Settings(console="off")
        config = {"lr": 0.1, "model": {"depth": 3, "act": "relu"}}
        run = wandb.init(
            mode="offline",
            dir=root,
            project="proj",
            group="grp",
            name="first",
            tags=["a", "b"],
            config=config,
            settings=settings,
        )
        for step in range(5):
            run.log({"loss": 1.0 / (step + 1), "acc": step / 10}, step=step)
        image = np.arange(8 * 6 * 3, dtype=np.uint8).reshape(8, 6, 3)
        histogram = wandb.Histogram(np.linspace(-1, 1, 100))
        run.log({"img": wandb.Image(image, caption="cap"), "hist": histogram}, step=5)
        run.log({"text": BIG_TEXT}, step=6)
        run.summary["best"] = 0.9

        weights = root / "weights.bin"
        weights.write_bytes(b"\1" * 100)
        artifact = wandb.Artifact("mymodel", type="model", metadata={"epochs": 2})
        artifact.add_file(str(weights))
        run.log_artifact(artifact, aliases=["best"])

        model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.ReLU(), torch.nn.Linear(3, 1))
        run.watch(model, log="all", log_freq=1)
        for _ in range(2):
            model(torch.randn(5, 4)).pow(2).mean().backward()
            run.log({"train_loss": 0.5})
        run.finish()

        resumed = wandb.init(
            mode="offline", dir=root, project="proj", id=run.id, resume="allow", settings=settings
        )
        resumed.log({"loss": 0.01})
        resumed.finish()
    return root / "wandb"


@pytest.fixture(scope="module")
def runs(wandb_dir: Path) -> list[OfflineRun]:
    return [read_run(d) for d in find_runs(wandb_dir)]


def test_find_runs_and_resume(runs: list[OfflineRun]) -> None:
    first, second = runs
    assert first.run_id == second.run_id and first.run_dir != second.run_dir
    assert (first.project, first.group, first.name, first.tags) == ("proj", "grp", "first", ["a", "b"])
    assert not first.resumed and second.resumed
    assert first.finished and first.exit_code == 0
    assert second.series("loss") == [(0, 0.01)]  # offline resume restarts at step 0


def test_scalars_config_summary(runs: list[OfflineRun]) -> None:
    run = runs[0]
    assert run.series("loss")[:5] == [(s, 1.0 / (s + 1)) for s in range(5)]
    assert {"loss", "acc", "img", "hist", "text", "_step"} <= set(run.history_keys())
    assert run.config["lr"] == 0.1 and run.config["model"] == {"depth": 3, "act": "relu"}
    assert run.summary["best"] == 0.9 and run.summary["loss"] == 0.2
    assert run.series("text") == [(6, BIG_TEXT)]


def test_image(runs: list[OfflineRun]) -> None:
    run = runs[0]
    [(step, image)] = run.series("img")
    assert step == 5
    assert image["_type"] == "image-file" and (image["width"], image["height"]) == (6, 8)
    assert image["caption"] == "cap" and image["path"].startswith("media/images/")
    assert image["path"] in run.files and run.file_path(image["path"]).is_file()


def test_histograms(runs: list[OfflineRun]) -> None:
    run = runs[0]
    [(_, hist)] = run.series("hist")
    assert hist["_type"] == "histogram" and sum(hist["values"]) == 100
    assert len(hist["bins"]) == len(hist["values"]) + 1
    for key in ("parameters/0.weight", "gradients/0.weight", "gradients/2.bias"):  # from run.watch
        assert len(run.series(key)) == 2 and run.series(key)[0][1]["_type"] == "histogram"


def test_artifact(runs: list[OfflineRun]) -> None:
    [artifact] = runs[0].artifacts
    assert (artifact["name"], artifact["type"]) == ("mymodel", "model")
    assert set(artifact["aliases"]) == {"best", "latest"}
    assert artifact["files"] == ["weights.bin"] and artifact["entries"][0]["size"] == 100
    assert artifact["metadata"] == {"epochs": 2}


def test_damaged_files(runs: list[OfflineRun], tmp_path: Path) -> None:
    log = next(runs[0].run_dir.glob("run-*.wandb"))
    data = log.read_bytes()
    assert len(data) > 2 * 32 * 1024  # several blocks
    bad = tmp_path / log.name

    bad.write_bytes(data[:-1])
    with pytest.raises(WandbLogError, match="truncated"):
        read_run(bad)
    partial = read_run(bad, strict=False)
    assert "truncated" in partial.error and not partial.finished
    assert partial.series("loss")[:5] == runs[0].series("loss")[:5]

    bad.write_bytes(data[: data.index(b"x" * 1000) + 50_000])  # inside the 100 KB record
    with pytest.raises(WandbLogError, match="truncated"):
        read_run(bad)

    flipped = bytearray(data)
    flipped[1000] ^= 0xFF
    bad.write_bytes(bytes(flipped))
    with pytest.raises(WandbLogError, match=r"corrupt|truncated"):
        read_run(bad)

    bad.write_bytes(b"not a wandb file")
    with pytest.raises(WandbLogError, match="not a W&B record log"):
        read_run(bad)

    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError):
        read_run(tmp_path / "empty")
