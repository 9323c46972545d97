"""What a run says: one `trainer` logger, a quiet console and a complete <run dir>/train.log.

Every message goes through Python's `logging`: the framework's own (the `trainer` logger and its children),
Lightning's, W&B's, Ray's and Python warnings (`warnings.warn`, which Lightning uses for its own).

- train.log keeps everything, with time, level, rank and source.
- The console shows the framework's lines and warnings that are about the user's run. Third-party
  information (Lightning's "GPU available: ...") and the warnings listed in `NOISE` (about a library's own
  internals, nothing the user can act on) stay in train.log only. `verbose=true` (`trainer -v`) shows
  everything.
- Rank zero speaks for the run; other ranks write only their warnings and errors, marked with their rank.
"""

import logging
import os
import re
import sys
import warnings
from pathlib import Path

LOG_FILE = "train.log"
SUMMARY_LOGGER = "trainer.summary"  # the end-of-run summary: shown as it is, without a prefix

# (where, what): a warning from a file or logger matching `where` whose message matches `what`.
NOISE: tuple[tuple[str, str], ...] = (
    # Lightning's own deprecated use of torch's pytree API.
    (r"lightning/pytorch/utilities/_pytree\.py", r"is deprecated"),
    # A local run on a machine that has SLURM's tools; launcher=slurm runs its tasks under srun itself.
    (r"lightning/fabric/plugins/environments/slurm\.py", r"The `srun` command is available"),
    # Resuming into the run dir is what auto-resume does.
    (r"lightning/pytorch/callbacks/model_checkpoint\.py", r"exists and is not empty"),
    # Every validation gathers all its items to every rank first (trainer/data/evaluation.py): the logged
    # values are the same on all ranks, and a sync would only average equal numbers.
    (r"lightning/pytorch/trainer/connectors/logger_connector/result\.py", r"sync_dist=True"),
)

_handlers: list[logging.Handler] = []
_rank = 0


def setup_logging(run_dir: str | Path | None, *, verbose: bool = False, rank: int | None = None) -> None:
    """(Re)configure the root logger: the console, and <run_dir>/train.log (appended to, so a resumed run
    keeps its history). Safe to call again, e.g. per trial of a sweep or once Lightning is imported."""
    global _rank
    _rank = env_rank() if rank is None else rank
    root = logging.getLogger()
    for handler in _handlers:
        root.removeHandler(handler)
        handler.close()
    _handlers.clear()
    for handler in list(root.handlers):  # Hydra's, or a library's that configured the root before us
        root.removeHandler(handler)

    console = logging.StreamHandler(sys.stderr)
    console.setFormatter(ConsoleFormatter())
    console.addFilter(_by_rank)
    if not verbose:
        console.addFilter(quiet)
    _handlers.append(console)
    if run_dir is not None:
        Path(run_dir).mkdir(parents=True, exist_ok=True)
        logfile = logging.FileHandler(Path(run_dir) / LOG_FILE, encoding="utf-8")
        logfile.setFormatter(
            logging.Formatter("%(asctime)s %(levelname)s [rank %(rank)s] %(name)s: %(message)s")
        )
        logfile.addFilter(_by_rank)
        _handlers.append(logfile)
    for handler in _handlers:
        root.addHandler(handler)
    root.setLevel(logging.INFO)
    adopt_library_loggers()
    warnings.showwarning = _log_warning


def adopt_library_loggers() -> None:
    """Lightning gives its loggers their own console handler when it is imported before the root has one
    (in a Ray worker, say); route them through ours instead, so each line appears once."""
    for name in ("lightning", "lightning.pytorch", "lightning.fabric", "pytorch_lightning"):
        logger = logging.getLogger(name)
        logger.handlers.clear()
        logger.propagate = True


def env_rank() -> int:
    """This process's global rank as the launchers set it (the order Lightning reads them in)."""
    for key in ("RANK", "LOCAL_RANK", "SLURM_PROCID", "JSM_NAMESPACE_RANK"):
        if key in os.environ:
            return int(os.environ[key])
    return 0


def _by_rank(record: logging.LogRecord) -> bool:
    record.rank = _rank
    return _rank == 0 or record.levelno >= logging.WARNING


def is_framework(record: logging.LogRecord) -> bool:
    return record.name == "trainer" or record.name.startswith(("trainer.", "hydra"))


def quiet(record: logging.LogRecord) -> bool:
    """The console's filter: the framework's lines, and third-party warnings except the known noise."""
    if is_framework(record):
        return True
    if record.levelno < logging.WARNING:
        return False
    where = getattr(record, "origin", record.pathname)
    return not any(re.search(w, where) and re.search(m, record.getMessage()) for w, m in NOISE)


class ConsoleFormatter(logging.Formatter):
    """`trainer: ...` for the framework's lines, `warning: ...` and `error: ...` for the rest; the rank
    under data parallelism when it is not zero."""

    def format(self, record: logging.LogRecord) -> str:
        message = record.getMessage()
        if record.name == SUMMARY_LOGGER:
            return message
        if record.levelno >= logging.ERROR:
            prefix = "error: "
        elif record.levelno >= logging.WARNING:
            prefix = "trainer: warning: " if is_framework(record) else "warning: "
        else:
            prefix = "trainer: " if is_framework(record) else f"{record.name}: "
        rank = getattr(record, "rank", 0)
        return f"{prefix}{f'[rank {rank}] ' if rank else ''}{message}"


def _log_warning(
    message: Warning | str,
    category: type[Warning],
    filename: str,
    lineno: int,
    file: object = None,
    line: object = None,
) -> None:
    """`warnings.showwarning`: a warning becomes one log record, its source file kept for the filters."""
    logging.getLogger("py.warnings").warning(
        "%s", message, extra={"origin": f"{filename}:{lineno}", "category": category.__name__}
    )
