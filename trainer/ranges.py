"""Value ranges in signatures, which the config check enforces before anything runs (trainer/config.py):
`batch_size: Positive` refuses `data.batch_size=0` in one line instead of a DataLoader traceback later."""

from dataclasses import dataclass
from typing import Annotated


@dataclass(frozen=True)
class AtLeast:
    minimum: float


Positive = Annotated[int, AtLeast(1)]
NonNegative = Annotated[int, AtLeast(0)]
