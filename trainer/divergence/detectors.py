"""Detectors that look at one number per step and say when it is out of line."""

import math
from collections import deque


class RollingZScore:
    """Flags a value more than `threshold` standard deviations above the mean of the last `window` values.

    Nothing is flagged before `warmup` values have been seen. Flagged and non-finite values stay out of the
    window, so one spike does not teach the detector that spikes are normal; after `patience` flagged values
    in a row they go in, so a lasting change of level becomes the new normal instead of an endless alarm.
    """

    def __init__(self, window: int = 200, warmup: int = 50, threshold: float = 6.0, patience: int = 10):
        if not 2 <= warmup <= window:
            raise ValueError(f"need 2 <= warmup <= window, got warmup={warmup}, window={window}")
        self.window, self.warmup, self.threshold, self.patience = window, warmup, threshold, patience
        self.values: deque[float] = deque(maxlen=window)
        self.streak = 0

    def update(self, value: float) -> float | None:
        """The z-score of `value` if it is a spike, else None."""
        if not math.isfinite(value):
            return None
        if len(self.values) >= self.warmup:
            mean = sum(self.values) / len(self.values)
            std = math.sqrt(sum((v - mean) ** 2 for v in self.values) / (len(self.values) - 1))
            z = (value - mean) / max(std, 1e-12 * max(1.0, abs(mean)))
            if z > self.threshold:
                self.streak += 1
                if self.streak >= self.patience:
                    self.values.append(value)
                return z
        self.streak = 0
        self.values.append(value)
        return None

    def state_dict(self) -> dict:
        return {"values": list(self.values)}

    def load_state_dict(self, state: dict) -> None:
        self.values = deque(state["values"], maxlen=self.window)


class CollapseDetector:
    """GAN collapse: for `steps` steps in a row the discriminator wins outright (its loss near zero, or
    D(x) near 1 with D(G(z)) near 0), so the generator gets no useful gradient."""

    def __init__(self, steps: int = 50, d_loss_below: float = 0.01, d_x_above: float = 0.99,
                 d_g_z_below: float = 0.01):
        self.steps, self.d_loss_below = steps, d_loss_below
        self.d_x_above, self.d_g_z_below = d_x_above, d_g_z_below
        self.streak = 0

    def update(self, loss_d: float, d_x: float, d_g_z: float) -> bool:
        winning = loss_d < self.d_loss_below or (d_x > self.d_x_above and d_g_z < self.d_g_z_below)
        self.streak = self.streak + 1 if winning else 0
        return self.streak >= self.steps
