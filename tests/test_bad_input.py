"""Bad input ends in one clear `error:` line naming the problem and the fix, a non-zero exit, no traceback,
and leaves what earlier runs saved untouched."""

import hashlib
from pathlib import Path

import pytest
from helpers import TINY_DCGAN, assert_clean_failure, run_cli

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
    files = [*run_dir.glob("checkpoints/*"), run_dir / "metrics.json", run_dir / "config.yaml"]
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
    "unknown key, plain (Hydra refuses it itself)": (
        ["+exp=dcgan", "trainer.max_epocs=3"],
        ["trainer.max_epocs", "did you mean trainer.max_epochs"],
    ),
    "wrong type": (["+exp=dcgan", "++trainer.max_epochs=ten"], ["trainer.max_epochs='ten'", "expected int"]),
    "wrong type in the task": (["+exp=dcgan", "task.lr=fast"], ["task.lr='fast'", "expected float"]),
    "impossible image size": (
        ["+exp=dcgan", "data.image_size=48"],
        ["data.image_size=48 is out of range", "a power of two"],
    ),
    "missing data.root": (["+exp=dcgan", "data=image_folder"], ["data.root"]),
    "missing data dir": (  # (resume=force: the run dir holds another config's run, refused first otherwise)
        ["+exp=dcgan", "data=image_folder", "data.root=/no/such/dir", "resume=force"],
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
    # Values that once ended in a traceback, or trained nothing and exited 0.
    "negative learning rate": (
        ["+exp=dcgan", "task.lr=-1"],
        ["task.lr=-1 is out of range", "float > 0, finite"],
    ),
    "NaN learning rate": (
        ["+exp=dcgan", "task.lr=nan"],
        ["task.lr=nan is out of range", "float > 0, finite"],
    ),
    "Adam beta of 2": (["+exp=dcgan", "task.beta1=2"], ["task.beta1=2 is out of range", "float in [0, 1)"]),
    "no latent space": (
        ["+exp=dcgan", "model.latent_dim=0"],
        ["model.latent_dim=0 is out of range", "int >= 1"],
    ),
    "no epochs": (["+exp=dcgan", "++trainer.max_epochs=0"], ["trainer.max_epochs=0 is out of range", "-1"]),
    "an empty replay buffer": (["+exp=dqn", "task.buffer_size=0"], ["task.buffer_size=0 is out of range"]),
    "a discount above 1": (["+exp=ppo", "task.gamma=1.5"], ["task.gamma=1.5 is out of range", "[0, 1]"]),
    "QA windows that never advance": (
        ["+exp=qa", "data.doc_stride=128"],
        ["data.doc_stride=128 is out of range", "data.max_length=256"],
    ),
    "a detector of no classes": (
        ["+exp=detector", "model.detector.num_classes=0"],
        ["model.detector.num_classes=0 is out of range"],
    ),
}


@pytest.mark.slow
@pytest.mark.parametrize("case", CASES)
def test_bad_config_values(case: str, trained_run: Path, home: Path) -> None:
    args, fragments = CASES[case]
    before = fingerprint(trained_run)
    tiny = FAST[1:] if args[0] == "+exp=dcgan" else ["logger=none"]  # (the tiny settings are the DCGAN's)
    result = run_cli(*tiny, *args, f"hydra.run.dir={trained_run}", home=home)
    assert_clean_failure(result, *fragments)
    assert result.returncode == 2
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
        "monitor.metric=val/pixel_fd",  # one folder, no classes: no classifier for val/fid
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
    """A run dir of another config is refused with the keys that differ; continued anyway (resume=force),
    its checkpoint is refused with the first tensor that does not fit."""
    before = fingerprint(trained_run)
    changed = [*FAST, "model.generator.width=16", f"hydra.run.dir={trained_run}"]
    result = run_cli(*changed, home=home)
    assert_clean_failure(
        result, "holds a run of another config (model.generator.width differs", "resume=force"
    )
    forced = run_cli(*changed, "resume=force", home=home)
    assert_clean_failure(forced, "of another model", "generator.net.0.weight")
    assert fingerprint(trained_run) == before


def test_a_misspelt_monitor_metric_names_the_metrics_logged(tmp_path: Path, home: Path) -> None:
    """Before training: the task declares what its validation logs (Task.validation_metrics)."""
    result = run_cli(*FAST, "monitor.metric=val/pixel_df", f"hydra.run.dir={tmp_path / 'run'}", home=home)
    assert_clean_failure(
        result, "monitor.metric=val/pixel_df is never logged", "did you mean monitor.metric=val/pixel_fd"
    )
    assert result.returncode == 2 and not (tmp_path / "run").exists()


def test_a_run_dir_that_cannot_be_created_is_one_line(tmp_path: Path, home: Path) -> None:
    (tmp_path / "a_file").write_text("in the way")
    run_dir = tmp_path / "a_file" / "run"
    assert_clean_failure(
        run_cli(*FAST, f"hydra.run.dir={run_dir}", home=home), f"hydra.run.dir={run_dir} cannot"
    )


@pytest.mark.slow
def test_a_wrong_value_never_reaches_the_slurm_queue(tmp_path: Path, home: Path) -> None:
    """Refused before a dry run writes job.sbatch, before even the run dir exists: a task's value, and a
    time limit sbatch would refuse (a dry run never asks sbatch)."""
    run_dir = tmp_path / "run"
    args = ["+exp=dcgan", "launcher=slurm", "slurm.dry_run=true", f"hydra.run.dir={run_dir}"]
    assert_clean_failure(run_cli(*args, "trainer.max_epochs=ten", home=home), "trainer.max_epochs='ten'")
    refused = run_cli(*args, "slurm.time=forever", home=home)
    assert_clean_failure(refused, "slurm.time='forever' is out of range", "days-hours:minutes:seconds")
    assert refused.returncode == 2 and not run_dir.exists()
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
