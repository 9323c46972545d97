"""What an alarm does, decided alone (trainer/divergence/policy.py): no training, no Lightning."""

from dataclasses import replace

import pytest

from trainer.divergence.policy import ActionPolicy, Decision, choose_action, detector_actions
from trainer.divergence.settings import DivergenceSettings, SpikeSettings
from trainer.errors import UserError


def choose(configured: str, before_update: bool = True, clippable: bool = True, rollbacks: int = 0):
    return choose_action(
        configured, before_update=before_update, clippable=clippable, rollbacks=rollbacks, max_rollbacks=3
    )


@pytest.mark.parametrize("before_update", [True, False])
@pytest.mark.parametrize("action", ["warn", "halt"])
def test_warn_and_halt_act_as_configured_before_and_after_the_update(
    action: str, before_update: bool
) -> None:
    assert choose(action, before_update=before_update) == (action, None)


def test_clip_clips_only_a_gradient_about_to_be_applied_that_has_a_limit() -> None:
    assert choose("clip") == ("clip", None)  # a gradient spike: down to the spike limit
    assert choose("clip", clippable=False) == ("warn", None)  # a NaN gradient: no limit to clip it to
    assert choose("clip", before_update=False) == ("warn", None)  # a loss: the update is done


def test_skip_after_the_update_rolls_back_instead() -> None:
    assert choose("skip") == ("skip", None)
    assert choose("skip", clippable=False) == ("skip", None)  # a NaN gradient is dropped
    assert choose("skip", before_update=False) == ("rollback", None)


def test_a_rollback_after_max_rollbacks_halts_and_says_why() -> None:
    assert choose("rollback", rollbacks=2) == ("rollback", None)
    assert choose("rollback", rollbacks=3) == ("halt", "3 rollbacks did not help")
    assert choose("skip", before_update=False, rollbacks=3) == ("halt", "3 rollbacks did not help")
    assert choose("skip", rollbacks=3) == ("skip", None)  # before the update a skip needs no rollback
    no_rollbacks = choose_action(
        "rollback", before_update=True, clippable=False, rollbacks=0, max_rollbacks=0
    )
    assert no_rollbacks == ("halt", "0 rollbacks did not help")


def policy(
    action: str = "warn", report_every: int = 200, max_rollbacks: int = 3, **actions: str
) -> ActionPolicy:
    every = dict.fromkeys(("nonfinite", "spike", "blowup", "level", "metric", "collapse"), action)
    return ActionPolicy({**every, **actions}, max_rollbacks, report_every)


def decide(p: ActionPolicy, detector: str, step: int, series: str = "loss", **kwargs) -> Decision | None:
    options = {"before_update": False, "clippable": False, "rollbacks": 0, **kwargs}
    return p.decide(detector, series, step, f"{series} is bad", **options)


def test_the_first_alarm_of_a_detector_in_a_batch_is_recorded_and_reported() -> None:
    p = policy("skip")
    assert decide(p, "nonfinite", 5, before_update=True) == Decision("skip", "loss is bad", True, True)
    assert p.acted_at == 5


def test_a_repeat_after_the_update_in_the_same_batch_does_nothing() -> None:
    """A NaN gradient also makes the loss NaN: the same news, once."""
    p = policy("rollback")
    assert decide(p, "nonfinite", 5, "grad_norm/net", before_update=True) is not None
    assert decide(p, "nonfinite", 5, "loss") is None
    assert decide(p, "spike", 5) == Decision("rollback", "loss is bad", True, True)  # another detector
    assert decide(p, "nonfinite", 6) is not None  # another batch


def test_a_repeat_on_a_gradient_still_acts_and_is_neither_recorded_nor_reported() -> None:
    """A GAN's second optimizer step of the batch: the gate has acted on it, and the guard does too."""
    p = policy("skip")
    decide(p, "nonfinite", 5, "grad_norm/discriminator", before_update=True)
    repeat = decide(p, "nonfinite", 5, "grad_norm/generator", before_update=True)
    assert repeat == Decision("skip", "grad_norm/generator is bad", reported=False, recorded=False)


def test_a_repeat_that_halts_is_reported() -> None:
    p = policy("rollback", max_rollbacks=1)
    decide(p, "nonfinite", 5, before_update=True)
    halt = decide(p, "nonfinite", 5, before_update=True, rollbacks=1)
    assert halt == Decision("halt", "loss is bad; 1 rollbacks did not help", reported=True, recorded=True)


def test_an_episode_of_spikes_on_one_series_is_reported_once_per_report_every_and_still_acts() -> None:
    p = policy("clip", report_every=100)
    first = decide(p, "spike", 10, "grad_norm/net", before_update=True, clippable=True)
    assert first == Decision("clip", "grad_norm/net is bad", reported=True, recorded=True)
    later = decide(p, "spike", 60, "grad_norm/net", before_update=True, clippable=True)
    assert later == Decision("clip", "grad_norm/net is bad", reported=False, recorded=True)  # it clips
    # in the same batch the detector has reported already; in the next, another series is another episode
    assert not decide(p, "spike", 60, "grad_norm/other", before_update=True).reported
    assert decide(p, "spike", 61, "grad_norm/other", before_update=True).reported
    assert decide(p, "spike", 110, "grad_norm/net", before_update=True).reported  # 100 steps after the report
    assert p.quiet_until == {"grad_norm/net": 210, "grad_norm/other": 161}


def test_levels_come_in_episodes_too_and_other_detectors_do_not() -> None:
    p = policy("warn", report_every=100)
    assert [decide(p, "level", step).reported for step in (50, 51, 150)] == [True, False, True]
    for detector in ("nonfinite", "blowup", "metric", "collapse"):
        assert [decide(p, detector, step).reported for step in (50, 51)] == [True, True], detector
    assert set(p.quiet_until) == {"loss"}


def test_a_halt_in_an_episode_is_reported() -> None:
    p = policy("warn", spike="halt")
    decide(p, "spike", 10)
    assert decide(p, "spike", 20) == Decision("halt", "loss is bad", reported=True, recorded=True)


def test_report_every_zero_reports_every_alarm() -> None:
    p = policy("warn", report_every=0)
    assert [decide(p, "spike", step).reported for step in (1, 2, 3)] == [True, True, True]


def test_each_detector_takes_its_own_action_else_the_guards() -> None:
    settings = replace(DivergenceSettings(action="halt"), spike=SpikeSettings(action="clip"))
    actions = detector_actions(settings)
    assert actions == {
        "nonfinite": "halt",
        "spike": "clip",
        "blowup": "halt",
        "level": "warn",
        "metric": "warn",
        "collapse": "warn",
    }
    assert detector_actions(DivergenceSettings())["nonfinite"] == "rollback"  # the yaml's default


def test_an_unknown_action_is_refused_in_one_line() -> None:
    settings = replace(DivergenceSettings(), spike=SpikeSettings(action="explode"))
    with pytest.raises(UserError, match=r"^divergence.spike.action=explode is not one of warn, clip, skip"):
        detector_actions(settings)
