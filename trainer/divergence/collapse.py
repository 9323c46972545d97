"""Collapses that only a task's own numbers show. Each report type (trainer/tasks/base.py) names the checks
that apply to it (`collapse_checks`), so that the watcher needs to know no report type:
- `discriminator_wins` (GANReport): a GAN's discriminator wins outright, D(x) > `d_x_above` with D(G(z)) <
  `d_g_z_below`, on more than `d_wins_share` of an epoch's steps: the generator gets almost no gradient to
  learn from. Healthy DCGANs on the digits pass through a phase where D wins most steps by a wide margin;
  outright (D(G(z)) < 0.005) they won at most 4% of an epoch's steps, the zoo's failing GANs all of them, and
  the one the issue named "never learns" 64% (scripts/bench_guard.py);
- `policy_entropy` (PolicyReport): a policy's entropy falls below `entropy_fraction` of the uniform policy's
  for `rl_steps` steps: it has become (nearly) deterministic and stops exploring;
- `policy_kl` (PolicyReport): one policy update moves the policy more than `max_policy_kl` (approximate KL
  divergence, nats) from the policy that collected its data: it left the trust region that PPO's clipping
  is meant to keep;
- `q_values` (ValueReport): Q-values exceed `value_multiple` times the largest return the rewards allow for
  `rl_steps` steps: the value estimates have blown up, which no correct Q-function can do;
and, at validation, the samples' diversity falls (`DiversityDrop`): mode collapse.
"""

import math
from typing import Any

from trainer.divergence.settings import CollapseSettings
from trainer.tasks.base import PolicyReport, StepReport, ValueReport

Found = tuple[str, str] | None  # (series, reason) of a collapse


class Streak:
    """True once a condition has held for `steps` steps in a row (then counting starts again)."""

    def __init__(self, steps: int):
        if steps < 1:
            raise ValueError(f"a streak needs steps >= 1, got {steps}")
        self.steps, self.count = steps, 0

    def update(self, holds: bool) -> bool:
        self.count = self.count + 1 if holds else 0
        if self.count >= self.steps:
            self.count = 0
            return True
        return False


class DiversityDrop:
    """Mode collapse seen at validation: the samples' diversity falls below `fraction` of the best it has
    reached, once that best is at least `reached` (an early generator is not diverse yet: not a collapse)."""

    def __init__(self, fraction: float = 0.5, reached: float = 0.3):
        self.fraction, self.reached = fraction, reached
        self.best = 0.0

    def update(self, diversity: float) -> bool:
        collapsed = (
            self.best >= self.reached and not diversity >= self.fraction * self.best
        )  # (NaN: collapsed)
        self.best = max(self.best, diversity) if math.isfinite(diversity) else self.best
        return collapsed


class EpochShare:
    """The share of an epoch's steps on which a condition held, said when the epoch ends."""

    def __init__(self) -> None:
        self.epoch, self.held, self.steps = -1, 0, 0

    def update(self, epoch: int, holds: bool) -> None:
        if epoch != self.epoch:
            self.epoch, self.held, self.steps = epoch, 0, 0
        self.held, self.steps = self.held + holds, self.steps + 1

    def share(self, epoch: int) -> float:
        return self.held / self.steps if self.steps and epoch == self.epoch else 0.0


class CollapseCheck:
    """One check of the steps of the report types that name it; after a rollback it starts again."""

    def step(self, report: Any, readings: dict[str, float], epoch: int) -> Found:
        return None

    def epoch_end(self, epoch: int) -> Found:
        return None

    def restart(self) -> None:
        pass


class DiscriminatorWins(CollapseCheck):
    def __init__(self, max_share: float, d_x_above: float, d_g_z_below: float):
        self.max_share, self.d_x_above, self.d_g_z_below = max_share, d_x_above, d_g_z_below
        self.won = EpochShare()

    def step(self, report: Any, readings: dict[str, float], epoch: int) -> Found:
        self.won.update(epoch, readings["D_x"] > self.d_x_above and readings["D_G_z"] < self.d_g_z_below)
        return None

    def epoch_end(self, epoch: int) -> Found:
        share = self.won.share(epoch)
        if share > self.max_share:
            return "D_G_z", (
                f"the discriminator won outright (D(x) > {self.d_x_above:g}, D(G(z)) < {self.d_g_z_below:g}) "
                f"on {share:.0%} of epoch {epoch}'s steps: the generator gets almost no gradient to learn"
            )
        return None

    def restart(self) -> None:
        self.won = EpochShare()


class PolicyEntropy(CollapseCheck):
    def __init__(self, fraction: float, steps: int):
        self.fraction, self.deterministic = fraction, Streak(steps)

    def step(self, report: PolicyReport, readings: dict[str, float], epoch: int) -> Found:
        if not report.max_entropy:  # continuous actions: no uniform policy to compare with
            return None
        entropy = readings["entropy"]
        if self.deterministic.update(entropy < self.fraction * report.max_entropy):
            return "entropy", (
                f"the policy's entropy has stayed below {self.fraction:g} of the uniform "
                f"policy's ({report.max_entropy:.3g}) for {self.deterministic.steps} steps "
                f"(now {entropy:.3g}): policy collapse"
            )
        return None

    def restart(self) -> None:
        self.deterministic.count = 0


class PolicyJump(CollapseCheck):
    def __init__(self, max_kl: float):
        self.max_kl = max_kl

    def step(self, report: Any, readings: dict[str, float], epoch: int) -> Found:
        if (kl := readings.get("approx_kl", 0.0)) > self.max_kl:
            return "approx_kl", (
                f"one update moved the policy {kl:.3g} nats (approximate KL) from the policy "
                f"that collected its data, more than {self.max_kl:g}: it left its trust "
                "region (learning rate too high?)"
            )
        return None


class ValueBlowup(CollapseCheck):
    def __init__(self, multiple: float, steps: int):
        self.multiple, self.blown_up = multiple, Streak(steps)

    def step(self, report: ValueReport, readings: dict[str, float], epoch: int) -> Found:
        if not report.max_return:  # (undiscounted: no bound)
            return None
        q = readings["q_values"]
        if self.blown_up.update(q > self.multiple * report.max_return):
            return "q_values", (
                f"the mean Q-value {q:.4g} has stayed above {self.multiple:g}x the largest "
                f"return the rewards allow ({report.max_return:.4g}) for {self.blown_up.steps} "
                "steps: the value estimates have blown up"
            )
        return None

    def restart(self) -> None:
        self.blown_up.count = 0


class CollapseWatch:
    """The collapse checks, each asked by the reports that name it (`StepReport.collapse_checks`), and the
    samples' diversity at validation."""

    def __init__(self, settings: CollapseSettings | None = None):
        settings = settings or CollapseSettings()
        self.d_wins = DiscriminatorWins(settings.d_wins_share, settings.d_x_above, settings.d_g_z_below)
        self.entropy = PolicyEntropy(settings.entropy_fraction, settings.rl_steps)
        self.q_values = ValueBlowup(settings.value_multiple, settings.rl_steps)
        self.checks: dict[str, CollapseCheck] = {
            "discriminator_wins": self.d_wins,
            "policy_entropy": self.entropy,
            "policy_kl": PolicyJump(settings.max_policy_kl),
            "q_values": self.q_values,
        }
        self.diversity = DiversityDrop(settings.diversity_fraction, settings.diversity_reached)

    def step(self, report: StepReport, readings: dict[str, float], epoch: int) -> Found:
        """(series, reason) when the step completes a collapse, else None."""
        for name in report.collapse_checks:
            if (found := self.checks[name].step(report, readings, epoch)) is not None:
                return found
        return None

    def epoch_end(self, epoch: int) -> Found:
        """(series, reason) when the epoch that ended was a collapse, else None."""
        return next((found for check in self.checks.values() if (found := check.epoch_end(epoch))), None)

    def restart(self) -> None:
        """After a rollback: streaks and the epoch's count start again."""
        for check in self.checks.values():
            check.restart()

    def validation(self, diversity: float) -> str | None:
        if self.diversity.update(diversity):
            return (
                f"the samples' diversity fell to {diversity:.3g} of the data's, "
                f"from {self.diversity.best:.3g} at best: mode collapse"
            )
        return None

    def state_dict(self) -> dict[str, Any]:
        """In the layout checkpoints have always had: a run resumes from an older one."""
        won = self.d_wins.won
        return {
            "streaks": [self.entropy.deterministic.count, self.q_values.blown_up.count],
            "d_wins": [won.epoch, won.held, won.steps],
            "best_diversity": self.diversity.best,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.entropy.deterministic.count, self.q_values.blown_up.count = state["streaks"]
        won = self.d_wins.won
        won.epoch, won.held, won.steps = state["d_wins"]
        self.diversity.best = state["best_diversity"]
