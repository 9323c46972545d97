"""Every config composes; --help lists the groups; the wheel carries the configs; errors name the key."""

import zipfile
from pathlib import Path

import pytest
from conftest import REPO, compose_config
from omegaconf import OmegaConf

from trainer.config import check_arguments, check_config
from trainer.errors import UserError

CONF = REPO / "conf"


def options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF / group).glob("*.yaml"))


@pytest.mark.parametrize("exp", options("exp"))
def test_every_exp_composes_and_resolves(exp: str, tmp_path: Path) -> None:
    cfg = compose_config(f"+exp={exp}", run_dir=tmp_path)
    OmegaConf.resolve(cfg)
    assert cfg.name == exp
    assert cfg.task._target_ and cfg.trainer._target_
    # The data a task learns from: a data module, or for RL the environments.
    assert (cfg.env._target_ and cfg.get("data") is None) if exp in ("ppo", "dqn") else cfg.data._target_


@pytest.mark.parametrize("preset", ["gpu", "ddp", "ddp_cpu", "cpu"])
@pytest.mark.parametrize("exp", options("exp"))
def test_every_exp_passes_the_config_check_under_every_trainer_preset(exp: str, preset: str, tmp_path: Path):
    """The presets set keys across groups (trainer=gpu: data.pin_memory, data.num_workers): each must be a
    parameter of every exp's data module. `+exp=detector trainer=gpu` once failed on data.pin_memory."""
    check_config(compose_config(f"+exp={exp}", f"trainer={preset}", run_dir=tmp_path))


@pytest.mark.parametrize(
    "group,option",
    [
        (g, o)
        for g in ("trainer", "logger", "callbacks", "debug", "launcher", "data", "env")
        for o in options(g)
    ],
)
def test_every_group_option_composes(group: str, option: str, tmp_path: Path) -> None:
    # data and env options belong to a task family
    exp = {"squad": "qa", "gym": "ppo", "coco": "detector"}.get(option, "dcgan")
    overrides = [f"+exp={exp}", f"{group}={option}"]
    if option == "image_folder":
        overrides.append(f"data.root={tmp_path}")
    cfg = compose_config(*overrides, run_dir=tmp_path)
    OmegaConf.resolve(cfg)


def test_exp_is_not_in_primary_defaults() -> None:
    primary = OmegaConf.load(CONF / "config.yaml")
    assert not any("exp" in str(entry) for entry in primary.defaults)


def test_gpu_preset_turns_on_the_fast_paths(tmp_path: Path) -> None:
    cfg = compose_config("+exp=dcgan", "trainer=gpu", run_dir=tmp_path)
    assert cfg.trainer.accelerator == "gpu" and cfg.trainer.precision == "bf16-mixed"
    assert cfg.perf.compile and cfg.perf.channels_last and cfg.data.pin_memory and cfg.data.num_workers > 0
    assert cfg.trainer.max_epochs == 25  # the exp still wins over the preset's defaults
    cpu = compose_config("+exp=dcgan", run_dir=tmp_path)
    assert not (cpu.perf.compile or cpu.perf.channels_last or cpu.data.pin_memory)


def test_unknown_key_is_refused_with_a_suggestion(tmp_path: Path) -> None:
    cfg = compose_config("+exp=dcgan", "++trainer.max_epocs=3", run_dir=tmp_path)
    from lightning.pytorch import Trainer

    with pytest.raises(UserError, match=r"trainer.max_epocs .*did you mean trainer.max_epochs"):
        check_arguments(Trainer, cfg.trainer, "trainer")


@pytest.mark.parametrize(
    "override,message",
    [
        ("++trainer.max_epochs=ten", r"trainer.max_epochs='ten' has the wrong type: expected int or null"),
        ("++trainer.precision=17", r"trainer.precision=17 has the wrong type"),
        (
            "++trainer.enable_progress_bar=maybe",
            r"enable_progress_bar='maybe' has the wrong type: expected bool",
        ),
    ],
)
def test_wrong_types_are_refused(override: str, message: str, tmp_path: Path) -> None:
    from lightning.pytorch import Trainer

    cfg = compose_config("+exp=dcgan", override, run_dir=tmp_path)
    with pytest.raises(UserError, match=message):
        check_arguments(Trainer, cfg.trainer, "trainer")


@pytest.mark.parametrize("exp", options("exp"))
def test_every_exp_passes_the_whole_config_check(exp: str, tmp_path: Path) -> None:
    check_config(compose_config(f"+exp={exp}", run_dir=tmp_path))


@pytest.mark.parametrize(
    "overrides,message",
    [
        (["data.batch_size=0"], r"data\.batch_size=0 is out of range: expected int >= 1"),
        (["data.num_workers=-1"], r"data\.num_workers=-1 is out of range: expected int >= 0"),
        (["seed=abc"], r"seed='abc' has the wrong type: expected int"),
        (["resume=sometimes"], r"resume='sometimes' has the wrong type: expected one of 'auto', 'never'"),
        (
            ["launcher=ray", "launcher.num_workers=0"],
            r"launcher\.num_workers=0 is out of range: expected int >= 1",
        ),
        (
            ["callbacks.last_checkpoint.every_n_train_steps=often"],
            r"callbacks\.last_checkpoint\.every_n_train_steps",
        ),
    ],
)
def test_the_whole_config_check_finds_a_bad_value_anywhere(
    overrides: list[str], message: str, tmp_path: Path
) -> None:
    with pytest.raises(UserError, match=message):
        check_config(compose_config("+exp=dcgan", *overrides, run_dir=tmp_path))


def test_wheel_carries_the_configs_and_runs_from_any_directory(tmp_path: Path, home: Path) -> None:
    import os
    import subprocess
    import sys

    from hatchling.builders.wheel import WheelBuilder

    wheel = Path(
        next(iter(WheelBuilder(str(REPO)).build(directory=str(tmp_path / "dist"), versions=["standard"])))
    )
    with zipfile.ZipFile(wheel) as zf:
        names = set(zf.namelist())
        assert {"trainer/conf/config.yaml", "trainer/conf/exp/dcgan.yaml", "trainer/run.py"} <= names
        zf.extractall(tmp_path / "site")
    env = {**os.environ, "PYTHONPATH": str(tmp_path / "site"), "HOME": str(home)}
    result = subprocess.run(
        [sys.executable, "-m", "trainer", "+exp=dcgan", "--cfg", "job"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert "name: dcgan" in result.stdout


def targets_in_conf() -> list[str]:
    found = {
        line.split("_target_:", 1)[1].split("#")[0].strip()
        for path in CONF.rglob("*.yaml")
        for line in path.read_text().splitlines()
        if "_target_:" in line
    }
    return sorted(t for t in found if not t.startswith("${"))


@pytest.mark.parametrize("target", targets_in_conf())
def test_signatures_read_from_source_match_the_imported_ones(target: str) -> None:
    import inspect

    from hydra.utils import get_object

    from trainer.config import _type_hints
    from trainer.signatures import source_signature

    read = source_signature(target)
    assert read is not None, f"{target}: the check would have to import it"
    params = inspect.signature(get_object(target)).parameters.values()
    assert read.names == [p.name for p in params if p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL)]
    assert read.takes_any == any(p.kind is p.VAR_KEYWORD for p in params)
    imported = _type_hints(get_object(target))
    assert read.hints == {k: imported[k] for k in read.hints}


def test_a_config_is_checked_without_importing_what_it_configures() -> None:
    import os
    import subprocess
    import sys

    code = (
        "import sys; from hydra import compose, initialize_config_dir\n"
        "from trainer.__main__ import config_dir; from trainer.config import check_config\n"
        "from trainer.errors import UserError\n"
        "with initialize_config_dir(config_dir(), version_base='1.3'):\n"
        "    cfg = compose('config', overrides=['+exp=dcgan', 'trainer.max_epochs=ten'])\n"
        "try:\n    check_config(cfg)\n"
        "except UserError as e:\n    print(e)\n"
        "print(sorted(m for m in ('torch', 'lightning', 'ray', 'transformers') if m in sys.modules))"
    )
    done = subprocess.run(
        [sys.executable, "-c", code],
        cwd=REPO / "tests",
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    assert done.stdout.splitlines() == [
        "trainer.max_epochs='ten' has the wrong type: expected int or null",
        "[]",
    ]
