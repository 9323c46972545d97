"""trainer: Hydra-composed Lightning training, launched locally, on Ray or on SLURM."""

__version__ = "0.1.0"
