"""What a run says: one `trainer` logger, a quiet console and a complete <run dir>/train.log.

Every message goes through Python's `logging`: the framework's own (the `trainer` logger and its children),
Lightning's, W&B's, Ray's, transformers' and Python warnings (`warnings.warn`, which Lightning uses for its
own). Under launcher=ray, what Ray's own processes print reaches the driver's train.log
(trainer/launchers/ray.py).

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
SUMMARY_LOGGER = "trainer.reporting.summary"  # the end-of-run summary: shown as it is, without a prefix
TRACEBACK = "Traceback (most recent call last):"

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
    # Ray's default for the clusters it starts (launcher=ray's own binds to loopback), said on every ray.init.
    (r"ray/_private/authentication/", r"Token authentication is enabled"),
)
# The libraries whose loggers print to the console themselves: Lightning's when the root has no handler yet
# (in a Ray worker, say), Ray's from its import on and Ray Train's in each of its processes.
SELF_PRINTING = ("lightning", "pytorch_lightning", "ray")

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
    console.setFormatter(ConsoleFormatter(verbose))
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
        handler.setLevel(logging.INFO)  # Ray Train keeps its loggers at DEBUG for its own files, not for ours
        root.addHandler(handler)
    root.setLevel(logging.INFO)
    adopt_library_loggers()
    adopt_transformers(verbose)
    warnings.showwarning = _log_warning


def adopt_library_loggers() -> None:
    """Routes the loggers of `SELF_PRINTING` libraries through the root's handlers instead of their own
    console handlers, so that each line appears once, the console's filters apply and train.log gets it. Their
    file handlers (Ray's session logs) stay. Call again once such a library is imported."""
    for name, logger in list(logging.root.manager.loggerDict.items()):
        if not isinstance(logger, logging.Logger) or name.split(".")[0] not in SELF_PRINTING:
            continue
        consoles = [h for h in logger.handlers if _is_console(h)]
        for handler in consoles:
            logger.removeHandler(handler)
        if consoles:
            logger.propagate = True


def _is_console(handler: logging.Handler) -> bool:
    return isinstance(handler, logging.StreamHandler) and not isinstance(handler, logging.FileHandler)


def adopt_transformers(verbose: bool) -> None:
    """transformers' loggers through ours (they print by themselves otherwise), and its progress bars off
    unless verbose: the "Loading weights" bar of every pretrained model, drawn by every rank."""
    from transformers.utils import logging as transformers_logging  # imported already with Lightning

    transformers_logging.disable_default_handler()
    transformers_logging.enable_propagation()
    if not verbose:
        transformers_logging.disable_progress_bar()  # Hugging Face hub's download bars too


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
    under data parallelism when it is not zero. A traceback inside a message (Ray Train's report of a worker's
    failed training function) only with `verbose`: train.log keeps it."""

    def __init__(self, verbose: bool = False) -> None:
        super().__init__()
        self.verbose = verbose

    def format(self, record: logging.LogRecord) -> str:
        message = record.getMessage() if self.verbose else without_traceback(record.getMessage())
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


def without_traceback(message: str) -> str:
    """The message with a traceback in it as one line: its own text and the exception's line."""
    text, found, trace = message.partition(TRACEBACK)
    if not found:
        return message
    lines = trace.splitlines()
    frames = [i for i, line in enumerate(lines) if line.startswith("  File ")]
    after = lines[frames[-1] + 1 :] if frames else lines
    exception = next((line for line in after if line.strip() and not line.startswith(" ")), "")
    return f"{text.rstrip()} {exception}".strip()


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
