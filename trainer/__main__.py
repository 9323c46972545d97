"""`python -m trainer +exp=dcgan [key=value ...]`: compose the config with Hydra, hand it to the launcher.

Problems the user can fix (config, data, checkpoints) end as one `error:` line and exit code 2; Hydra's own
composition errors (an unknown group option lists the available ones) exit with 1.
"""

import os
import sys
from pathlib import Path

os.environ.setdefault("HYDRA_FULL_ERROR", "0")

import hydra  # noqa: E402
from omegaconf import DictConfig  # noqa: E402
from omegaconf.errors import OmegaConfBaseException  # noqa: E402

from trainer.errors import UserError  # noqa: E402


def config_dir() -> str:
    """The configs inside an installed wheel, else the repository's top-level conf/."""
    here = Path(__file__).resolve().parent
    packaged = here / "conf"
    return str(packaged if packaged.is_dir() else here.parent / "conf")


@hydra.main(version_base="1.3", config_path=config_dir(), config_name="config")
def _hydra_main(cfg: DictConfig) -> None:
    from trainer.config import build

    try:
        launcher = build(cfg.launcher, "launcher")
        launcher.launch(cfg)
    except UserError as e:
        _fail(one_line(e))
    except OmegaConfBaseException as e:  # a missing mandatory value (???), a broken interpolation
        key = getattr(e, "full_key", None)
        _fail(f"config key {key}: {one_line(e)}" if key else one_line(e))
    finally:
        print(f"trainer: run dir {cfg.get('run_dir', '?')}", file=sys.stderr)


def one_line(error: BaseException) -> str:
    """The user-facing line, also when the error was re-raised from a DataLoader worker."""
    lines = [line.strip() for line in str(error).strip().splitlines() if line.strip()] or [type(error).__name__]
    if len(lines) > 1 and "Traceback" in str(error):
        return lines[-1].split("UserError: ", 1)[-1]
    return lines[0].split("\n    full_key:")[0]


def _fail(message: str) -> None:
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)


def main() -> None:
    _hydra_main()


if __name__ == "__main__":
    main()
