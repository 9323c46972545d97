"""One module per task family; each is a LightningModule whose training step reads like the algorithm."""

import lightning as L


def is_logging_step(module: L.LightningModule) -> bool:
    """True on the steps whose logged values Lightning writes out (every `trainer.log_every_n_steps`).

    `self.log` costs roughly 0.4 ms per call on CPU; logging per-step values only on these steps keeps
    the loop within a few percent of a hand-written one. (Lightning's own test of this is private API;
    the lightning pin in pyproject.toml keeps it stable, and tests/test_cli.py reads the values back.)
    """
    return module.trainer._logger_connector.should_update_logs
