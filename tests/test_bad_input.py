"""Bad input ends in one clear `error:` line naming the problem and the fix, a non-zero exit, no traceback,
and leaves what earlier runs saved untouched."""

import hashlib
from pathlib import Path

import pytest
from conftest import TINY_DCGAN, assert_clean_failure, run_cli

FAST = [*TINY_DCGAN, "logger=none", "++trainer.max_epochs=1"]


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A finished tiny run whose files must survive every failing command below."""
    run_dir = tmp_path_factory.mktemp("trained") / "run"
    home = tmp_path_factory.mktemp("home")
    result = run_cli(*FAST, f"hydra.run.dir={run_dir}", home=home)
    assert result.returncode == 0, result.stderr[-3000:]
    return run_dir


def fingerprint(run_dir: Path) -> dict[str, str]:
    files = [*run_dir.glob("checkpoints/*"), run_dir / "metrics.json"]
    return {str(p.relative_to(run_dir)): hashlib.sha256(p.read_bytes()).hexdigest() for p in files}


def image_dir(tmp_path: Path, corrupt: bool) -> Path:
    from PIL import Image

    folder = tmp_path / "images"
    folder.mkdir()
    for i in range(40):
        Image.new("RGB", (20, 20), (i * 6, 100, 50)).save(folder / f"ok_{i:02d}.png")
    if corrupt:
        (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    return folder


CASES = {
    "unknown exp": (["+exp=gan9000"], ["exp=gan9000 is not an option", "+exp=NAME", "dcgan"]),
    "unknown group option": (
        ["+exp=dcgan", "logger=mlflow"],
        ["logger=mlflow", "csv, none, tensorboard, wandb"],
    ),
    "unknown key": (
        ["+exp=dcgan", "++trainer.max_epocs=3"],
        ["trainer.max_epocs", "did you mean trainer.max_epochs"],
    ),
    "wrong type": (["+exp=dcgan", "++trainer.max_epochs=ten"], ["trainer.max_epochs='ten'", "expected int"]),
    "wrong type in the task": (["+exp=dcgan", "task.lr=fast"], ["task.lr='fast'", "expected float"]),
    "impossible image size": (["+exp=dcgan", "data.image_size=48"], ["image_size must be a power of two"]),
    "missing data.root": (["+exp=dcgan", "data=image_folder"], ["data.root"]),
    "missing data dir": (
        ["+exp=dcgan", "data=image_folder", "data.root=/no/such/dir"],
        ["data.root=/no/such/dir is not a directory"],
    ),
    "missing checkpoint": (
        ["+exp=dcgan", "ckpt_path=/no/such.ckpt"],
        ["ckpt_path=/no/such.ckpt does not exist"],
    ),
    "batch size of 0": (
        ["+exp=dcgan", "data.batch_size=0"],
        ["data.batch_size=0 is out of range", "int >= 1"],
    ),
    "seed not a number": (["+exp=dcgan", "seed=abc"], ["seed='abc' has the wrong type", "expected int"]),
    "negative loader workers": (["+exp=dcgan", "data.num_workers=-2"], ["data.num_workers=-2", "int >= 0"]),
}


@pytest.mark.slow
@pytest.mark.parametrize("case", CASES)
def test_bad_config_values(case: str, trained_run: Path, home: Path) -> None:
    args, fragments = CASES[case]
    before = fingerprint(trained_run)
    result = run_cli(*FAST[1:], *args, f"hydra.run.dir={trained_run}", home=home)
    assert_clean_failure(result, *fragments)
    assert fingerprint(trained_run) == before


@pytest.mark.slow
@pytest.mark.parametrize("corrupt", [True, False])
def test_image_folder(tmp_path: Path, home: Path, corrupt: bool) -> None:
    folder = image_dir(tmp_path, corrupt)
    result = run_cli(
        *FAST,
        "data=image_folder",
        f"data.root={folder}",
        "data.batch_size=8",
        f"hydra.run.dir={tmp_path / 'run'}",
        home=home,
    )
    if corrupt:
        assert_clean_failure(result, "cannot read image", "broken.png", "remove or replace")
    else:
        assert result.returncode == 0, result.stderr[-3000:]
        assert (tmp_path / "run" / "checkpoints" / "last.ckpt").is_file()


@pytest.mark.slow
def test_corrupt_last_checkpoint_is_reported_and_kept(tmp_path: Path, home: Path, trained_run: Path) -> None:
    run_dir = tmp_path / "run"
    (run_dir / "checkpoints").mkdir(parents=True)
    last = run_dir / "checkpoints" / "last.ckpt"
    last.write_bytes((trained_run / "checkpoints" / "last.ckpt").read_bytes()[:5000])  # a torn copy
    result = run_cli(*FAST, f"hydra.run.dir={run_dir}", home=home)
    assert_clean_failure(result, "last.ckpt is corrupt", "resume=never")
    assert last.stat().st_size == 5000  # left for the user to inspect


@pytest.mark.slow
def test_checkpoint_of_another_model(tmp_path: Path, home: Path, trained_run: Path) -> None:
    before = fingerprint(trained_run)
    result = run_cli(*FAST, "model.generator.width=16", f"hydra.run.dir={trained_run}", home=home)
    assert_clean_failure(result, "of another model", "generator.net.0.weight")
    assert fingerprint(trained_run) == before


@pytest.mark.slow
def test_a_misspelt_monitor_metric_names_the_metrics_logged(tmp_path: Path, home: Path) -> None:
    result = run_cli(*FAST, "monitor.metric=val/pixel_df", f"hydra.run.dir={tmp_path / 'run'}", home=home)
    assert_clean_failure(result, "monitor.metric=val/pixel_df is never logged", "'val/pixel_fd'")


def test_a_run_dir_that_cannot_be_created_is_one_line(tmp_path: Path, home: Path) -> None:
    (tmp_path / "a_file").write_text("in the way")
    run_dir = tmp_path / "a_file" / "run"
    assert_clean_failure(
        run_cli(*FAST, f"hydra.run.dir={run_dir}", home=home), f"hydra.run.dir={run_dir} cannot"
    )


@pytest.mark.slow
def test_a_wrong_value_never_reaches_the_slurm_queue(tmp_path: Path, home: Path) -> None:
    run_dir = tmp_path / "run"
    args = ["+exp=dcgan", "launcher=slurm", "slurm.dry_run=true", f"hydra.run.dir={run_dir}"]
    assert_clean_failure(run_cli(*args, "trainer.max_epochs=ten", home=home), "trainer.max_epochs='ten'")
    assert not (run_dir / "slurm" / "job.sbatch").exists()
    assert run_cli(*args, home=home).returncode == 0 and (run_dir / "slurm" / "job.sbatch").is_file()


@pytest.mark.slow
def test_printing_a_config_checks_it_first(home: Path) -> None:
    wrong = run_cli("+exp=dcgan", "trainer.max_epochs=ten", "--cfg", "job", home=home)
    assert_clean_failure(wrong, "trainer.max_epochs='ten'")
    printed = run_cli("+exp=dcgan", "--cfg", "job", home=home)
    assert printed.returncode == 0 and "name: dcgan" in printed.stdout


@pytest.mark.slow
def test_a_sweep_with_a_wrong_value_starts_no_trial(tmp_path: Path, home: Path) -> None:
    sweep = ["-m", *FAST, "seed=1,2", f"hydra.sweep.dir={tmp_path / 'sweep'}"]
    assert_clean_failure(run_cli(*sweep, "data.batch_size=0", home=home), "data.batch_size=0 is out of range")
    assert not (tmp_path / "sweep" / "0").exists()
