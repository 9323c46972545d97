"""What an alarm does: the guard's decisions, apart from Lightning and torch, so that each can be tested alone
(tests/test_guard_policy.py).

An alarm acts as its detector's action says (`divergence.<detector>.action`, else `divergence.action`), with
three exceptions: `clip` clips only a gradient that has a limit to clip it to, and warns elsewhere; `skip`
after the update (a loss, a collapse) rolls back instead; and `rollback` after `max_rollbacks` halts. Every
alarm acts but a detector's later ones of a batch after its update, which are the same news (a NaN gradient
also makes the loss NaN). A detector's first alarm of a batch is recorded in the events file, and reported
(bundle, picture, warning) unless an alarm of the same series was within `report_every` steps (spikes and
levels come in episodes); a halt always is.
"""

from collections.abc import Mapping
from dataclasses import dataclass
from typing import get_args

from trainer.divergence.settings import Action, DivergenceSettings
from trainer.errors import UserError

ACTIONS: tuple[Action, ...] = get_args(Action)
DETECTORS = ("nonfinite", "spike", "blowup", "level", "metric", "collapse")
EPISODIC = ("spike", "level")  # detectors whose alarms come in episodes, reported once per `report_every`


def detector_actions(settings: DivergenceSettings) -> dict[str, Action]:
    """Each detector's action: its own, else the guard's."""
    actions: dict[str, Action] = {
        name: getattr(settings, name).action or settings.action for name in DETECTORS
    }
    for name, chosen in actions.items():
        if chosen not in ACTIONS:  # (the config check says it first; a config built in code gets here)
            raise UserError(f"divergence.{name}.action={chosen} is not one of {', '.join(ACTIONS)}")
    return actions


def choose_action(
    configured: Action, *, before_update: bool, clippable: bool, rollbacks: int, max_rollbacks: int
) -> tuple[Action, str | None]:
    """The action an alarm takes, and why it is not the configured one where it had to change (else None).
    `before_update`: the alarm is on a gradient the gate has decided on before its update; `clippable`: it
    has a limit to clip that gradient down to."""
    action = configured
    if action == "clip" and not (before_update and clippable):
        action = "warn"  # only a gradient about to be applied can be clipped
    if action == "skip" and not before_update:
        action = "rollback"  # the update has happened; the way back is the last snapshot
    if action == "rollback" and rollbacks >= max_rollbacks:
        return "halt", f"{max_rollbacks} rollbacks did not help"
    return action, None


@dataclass(frozen=True)
class Decision:
    action: Action
    reason: str  # the alarm's, and why a rollback became a halt
    reported: bool  # a bundle, a picture and a warning
    recorded: bool  # a line in the events file


class ActionPolicy:
    """Decides each alarm as it comes, remembering what the alarms of a batch and of an episode have done."""

    def __init__(self, actions: Mapping[str, Action], max_rollbacks: int, report_every: int):
        self.actions, self.max_rollbacks, self.report_every = dict(actions), max_rollbacks, report_every
        self.acted_at = -1  # the step of the last alarm
        self._acted_by: set[str] = set()  # the detectors that have acted on it
        self.quiet_until: dict[str, int] = {}  # an episode of alarms on one series is reported once

    def decide(
        self,
        detector: str,
        series: str,
        step: int,
        reason: str,
        *,
        before_update: bool,
        clippable: bool,
        rollbacks: int,
    ) -> Decision | None:
        """What the alarm of `detector` on `series` at `step` does; None: nothing (its detector has acted on
        this batch already, and the alarm is not on a gradient about to be applied)."""
        if step != self.acted_at:
            self.acted_at, self._acted_by = step, set()
        first = detector not in self._acted_by
        if not first and not before_update:
            return (
                None  # this detector has acted on the batch already: a NaN gradient also makes the loss NaN
            )
        self._acted_by.add(detector)
        action, why = choose_action(
            self.actions[detector],
            before_update=before_update,
            clippable=clippable,
            rollbacks=rollbacks,
            max_rollbacks=self.max_rollbacks,
        )
        episodic = detector in EPISODIC
        quiet = step < self.quiet_until.get(series, 0)
        reported = action == "halt" or (first and not (episodic and quiet))
        if episodic and reported:
            self.quiet_until[series] = step + self.report_every
        return Decision(action, f"{reason}; {why}" if why else reason, reported, recorded=first or reported)
