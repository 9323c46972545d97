"""Every config composes; --help lists the groups; the wheel carries the configs; errors name the key."""

import os
import sys
import zipfile
from dataclasses import asdict
from pathlib import Path

import pytest
from helpers import REPO, compose_config
from omegaconf import OmegaConf

from trainer.cli.preflight import check_before_hydra
from trainer.config.build import build_settings, check_arguments, import_target
from trainer.config.check import check_config
from trainer.config.signatures import class_attribute
from trainer.distributed.settings import DistributedSettings
from trainer.divergence.settings import DivergenceSettings
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
    assert cfg.perf.channels_last and cfg.data.pin_memory and cfg.data.num_workers > 0
    assert not cfg.perf.compile  # measured no faster on a GPU (conf/trainer/gpu.yaml): the user's switch
    exp = OmegaConf.load(REPO / "conf/exp/dcgan.yaml")
    assert cfg.trainer.max_epochs == exp.trainer.max_epochs  # the exp still wins over the preset's defaults
    cpu = compose_config("+exp=dcgan", run_dir=tmp_path)
    assert not (cpu.perf.compile or cpu.perf.channels_last or cpu.data.pin_memory)


def test_unknown_key_is_refused_with_a_suggestion(tmp_path: Path) -> None:
    cfg = compose_config("+exp=dcgan", "++trainer.max_epocs=3", run_dir=tmp_path)
    from lightning.pytorch import Trainer

    with pytest.raises(UserError, match=r"trainer.max_epocs .*did you mean trainer.max_epochs"):
        check_arguments(Trainer, cfg.trainer, "trainer")


@pytest.mark.parametrize(
    "overrides,message",
    [
        # Hydra itself refuses a plain override of a key that is not there, with a page of text
        (["task.lrr=1"], "task.lrr is not an option of trainer.tasks.gan.DCGAN: did you mean task.lr?"),
        (["+task.lrr=1"], "task.lrr is not an option of trainer.tasks.gan.DCGAN: did you mean task.lr?"),
        (
            ["trainer.max_epocs=3"],
            "trainer.max_epocs is not an option of lightning.pytorch.Trainer: did you mean",
        ),
        (["monitor.metricc=x"], "monitor.metricc is not a key of monitor: did you mean monitor.metric?"),
        (["+monitor.metricc=x"], "monitor.metricc is not a key of monitor: did you mean monitor.metric?"),
        (["++monitor.metricc=x"], "monitor.metricc is not a key of monitor: did you mean monitor.metric?"),
        (["++seedd=1"], "seedd is not a key of the config: did you mean seed?"),
        (["++perf.nope=1"], "perf.nope is not a key of perf: its keys are compile, compile_backend,"),
        (  # settings within settings: checked against their own class (trainer/divergence/settings.py)
            ["divergence.spike.treshold=3"],
            "divergence.spike.treshold is not an option of trainer.divergence.settings.SpikeSettings: "
            "did you mean divergence.spike.threshold?",
        ),
        (
            ["+distributed.outer.lrr=1"],
            "distributed.outer.lrr is not an option of trainer.distributed.settings.OuterSettings: "
            "did you mean distributed.outer.lr?",
        ),
        (
            ["divergence.spike.per_series.x=1"],  # (an empty node takes any key, added with +)
            "divergence.spike.per_series.x is not a key of divergence.spike.per_series: to add it, write +",
        ),
    ],
)
def test_a_key_no_option_has_is_one_line_with_or_without_plus(overrides: list[str], message: str) -> None:
    with pytest.raises(UserError) as refused:
        check_before_hydra(["+exp=dcgan", *overrides])
    assert str(refused.value).startswith(message)


@pytest.mark.parametrize(
    "overrides",
    [
        ["++seed=3", "++monitor.metric=train/d_loss"],  # keys that are there; a train/ metric is the step's
        ["+divergence.spike.per_series.x={threshold: 8}"],  # an empty node takes any key
        ["++trainer.max_epochs=1", "hparams_search=dcgan_optuna"],  # a group, and a sweep's values
        ["+tune.num_samples=2", "seed=1,2"],  # a node that configures a class (SETTINGS), a sweep
    ],
)
def test_keys_that_are_there_or_may_be_added_pass(overrides: list[str]) -> None:
    check_before_hydra(["+exp=dcgan", *overrides])


def test_a_new_key_for_a_target_that_takes_any_is_added_with_plus(tmp_path: Path, monkeypatch) -> None:
    (tmp_path / "takes_any_keyword.py").write_text(
        "class Task:\n    def __init__(self, **kwargs):\n        pass\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    own = ["+exp=dcgan", "task._target_=takes_any_keyword.Task"]
    with pytest.raises(
        UserError, match=r"^task\.verbosity is not a key of task: to add it, write \+task\.verbosity=1$"
    ):
        check_before_hydra([*own, "task.verbosity=1"])  # (which Hydra would refuse)
    check_before_hydra([*own, "+task.verbosity=1"])


def test_a_monitor_metric_the_task_does_not_declare_is_refused_before_training(tmp_path: Path) -> None:
    cfg = compose_config("+exp=dcgan", "monitor.metric=val/pixel_df", run_dir=tmp_path)
    with pytest.raises(UserError) as refused:
        check_config(cfg)
    assert str(refused.value) == (
        "monitor.metric=val/pixel_df is never logged by trainer.tasks.gan.DCGAN (its validation logs "
        "val/fid, val/inception_score, val/fid_real_floor, val/inception_score_real_ceiling, val/pixel_fd, "
        "val/sample_diversity): did you mean monitor.metric=val/pixel_fd?"
    )


def test_declared_metrics_are_read_from_source_through_the_public_task(tmp_path: Path, monkeypatch) -> None:
    """An own task subclasses `trainer.Task`, exported lazily: the check follows it to the Task's own
    declaration (none) without importing anything, and reads a subclass's own."""
    (tmp_path / "own_declarations.py").write_text(
        "from trainer import Task\n\n\nclass Quiet(Task):\n    pass\n\n\n"
        "class Loud(Quiet):\n    validation_metrics = {'val/a': 'max', 'val/b': None}\n\n\n"
        "class Louder(Loud):\n    pass\n"
    )
    monkeypatch.syspath_prepend(tmp_path)
    assert class_attribute("own_declarations.Quiet", "validation_metrics") == {}
    assert class_attribute("own_declarations.Louder", "validation_metrics") == {"val/a": "max", "val/b": None}
    assert "own_declarations" not in sys.modules


def test_an_unimportable_target_says_why(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))  # (as `trainer` and `python -m trainer` do)
    (tmp_path / "raises_at_import.py").write_text("1 / 0\n")
    expected = {
        "not_a_module_here.Task": (
            f"no module named not_a_module_here (looked in the working directory {tmp_path} and "
            f"{'PYTHONPATH ' if os.environ.get('PYTHONPATH') else 'the installed packages'}"
        ),
        "not_a_package_here.tasks.Task": "no module named not_a_package_here (",
        "trainer.tasks.gan.DCGA": "module trainer.tasks.gan (",
        "raises_at_import.Task": "importing raises_at_import raised ZeroDivisionError: division by zero",
    }
    for target, reason in expected.items():
        with pytest.raises(UserError) as refused:
            import_target(target, "task")
        assert str(refused.value).startswith(f"task._target_={target} cannot be imported: {reason}")
    with pytest.raises(UserError, match=r"has no DCGA: did you mean trainer\.tasks\.gan\.DCGAN\?$"):
        import_target("trainer.tasks.gan.DCGA", "task")
    with pytest.raises(UserError, match=r"holds not_a_package_here/, or add it to PYTHONPATH$"):
        import_target("not_a_package_here.tasks.Task", "task")


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


def test_settings_default_to_what_conf_ships() -> None:
    """The settings classes that check and build `divergence` and `distributed` say what conf/ says."""
    shipped = OmegaConf.to_container(OmegaConf.load(CONF / "divergence" / "default.yaml"))
    shipped["metric"].update(name=None, mode="min")  # (conf/ takes monitor.metric and monitor.mode)
    assert asdict(DivergenceSettings()) == shipped
    distributed = OmegaConf.to_container(OmegaConf.load(CONF / "config.yaml").distributed)
    assert asdict(DistributedSettings()) == distributed


def test_settings_are_built_with_the_settings_within_them() -> None:
    node = {"action": "halt", "spike": {"threshold": 8.0, "per_series": {"grad_norm/*": {"min_ratio": 10}}}}
    settings = build_settings(DivergenceSettings, node, "divergence")
    assert settings.action == "halt" and settings.spike.threshold == 8.0 and settings.spike.window == 200
    assert settings.spike.per_series == {"grad_norm/*": {"min_ratio": 10}} and settings.level.window == 20
    with pytest.raises(UserError, match=r"^divergence\.spike: .*'treshold'"):
        build_settings(DivergenceSettings, {"spike": {"treshold": 8.0}}, "divergence")


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
    from hydra.utils import get_object

    from trainer.config.build import _type_hints
    from trainer.config.signatures import source_signature

    read = source_signature(target)
    assert read is not None, f"{target}: the check would have to import it"
    obj = get_object(target)
    names, takes_any = parameters(obj)
    own = {k: v for k, v in read.hints.items() if k in names}
    assert own == {k: _type_hints(obj)[k] for k in own}
    if read.names != names:  # its `**kwargs` go on to its base class's __init__: the base's parameters follow
        base = obj.__mro__[1]
        base_names, takes_any = parameters(base)
        names += [n for n in base_names if n not in names]
        # (Lightning's own hints name classes imported only for type checkers: where importing resolves them)
        inherited = _type_hints(base)
        assert {k: read.hints[k] for k in inherited if k in read.hints} == {
            k: inherited[k] for k in inherited if k in read.hints
        }
    assert read.names == names
    assert read.takes_any == takes_any


def parameters(obj: object) -> tuple[list[str], bool]:
    """The names a config may set, and whether it may set any other (`**kwargs`)."""
    import inspect

    params = inspect.signature(obj).parameters.values()
    names = [p.name for p in params if p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL)]
    return names, any(p.kind is p.VAR_KEYWORD for p in params)


def test_a_config_is_checked_without_importing_what_it_configures() -> None:
    import os
    import subprocess
    import sys

    code = (
        "import sys; from hydra import compose, initialize_config_dir\n"
        "from trainer.cli.preflight import config_dir; from trainer.config.check import check_config\n"
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
