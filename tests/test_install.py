"""The distribution as a user gets it: the wheel, installed with plain pip (no bootstrap) into a fresh
virtual environment with every extra, trains from another directory."""

import subprocess
import venv
from pathlib import Path

import pytest
from helpers import REPO, TINY_DCGAN, cli_env, run_cli

from trainer import __version__


@pytest.mark.slow
def test_the_wheel_installs_with_plain_pip_and_trains(tmp_path: Path, home: Path) -> None:
    from hatchling.builders.wheel import WheelBuilder

    (wheel,) = WheelBuilder(str(REPO)).build(directory=str(tmp_path / "dist"), versions=["standard"])
    assert Path(wheel).name == f"guarded_trainer-{__version__}-py3-none-any.whl"
    venv.create(tmp_path / "venv", with_pip=True)
    python = tmp_path / "venv" / "bin" / "python"

    def run(*args: str, timeout: float = 900) -> subprocess.CompletedProcess:
        env = {k: v for k, v in cli_env(home).items() if k != "PYTHONPATH"}  # the installed package only
        return subprocess.run(args, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=timeout)

    installed = run(str(python), "-m", "pip", "install", "--quiet", f"{wheel}[all]")
    assert installed.returncode == 0, installed.stderr[-3000:]
    checked = run(str(python), "-m", "pip", "check")
    assert checked.returncode == 0, checked.stdout  # every requirement of every extra resolves together
    trainer = str(tmp_path / "venv" / "bin" / "trainer")
    assert run(trainer, "--version").stdout.strip() == f"trainer {__version__}"
    located = run(str(python), "-c", "import trainer; print(trainer.__file__)")
    assert str(tmp_path / "venv") in located.stdout  # not the source tree

    printed = run(trainer, "+exp=dcgan", "--cfg", "job")
    assert printed.returncode == 0 and "name: dcgan" in printed.stdout, printed.stderr[-2000:]
    run_dir = tmp_path / "run"
    trained = run(trainer, *TINY_DCGAN, "++trainer.max_epochs=1", "logger=none", f"hydra.run.dir={run_dir}")
    assert trained.returncode == 0, trained.stderr[-3000:]
    assert (run_dir / "checkpoints" / "last.ckpt").is_file() and (run_dir / "metrics.json").is_file()


@pytest.mark.parametrize(
    "args,torch_index",
    [
        ([], ""),
        (["--cpu"], " --index-url https://download.pytorch.org/whl/cpu"),
        (["--cuda", "12.6"], " --index-url https://download.pytorch.org/whl/cu126"),
    ],
)
def test_bootstrap_installs_the_torch_build_asked_for(args: list[str], torch_index: str) -> None:
    said = subprocess.run(
        ["bash", str(REPO / "scripts" / "bootstrap.sh"), *args, "--print"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert said.returncode == 0 and said.stdout.strip() == f"pip install torch==2.13.0{torch_index}".strip()


@pytest.mark.parametrize("args", [["--cuda", "twelve"], ["--cuda"], ["--gpu"]])
def test_bootstrap_refuses_a_build_it_cannot_name(args: list[str]) -> None:
    said = subprocess.run(
        ["bash", str(REPO / "scripts" / "bootstrap.sh"), *args, "--print"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert said.returncode == 2 and said.stderr.startswith("error: ") and "--cuda" in said.stderr


def test_version_is_the_packages(home: Path) -> None:
    assert run_cli("--version", home=home).stdout.strip() == f"trainer {__version__}"
