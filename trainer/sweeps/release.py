"""Frees the workers' CPUs and GPUs of a trial that Tune stopped.

Tune stops a trial (ASHA at a rung) by ending the trial's actor, and the trial's Ray Train controller dies
with it. The placement group that reserved the controller's workers belongs to the job (the sweep's driver)
and outlives them. Ray Train leaves it to a detached actor (its PlacementGroupCleaner), which reaches Ray's
state API through RAY_ADDRESS or <Ray temp dir>/ray_current_cluster: when these name another cluster (a second
local Ray cluster on the machine, a shell set up for job submission) it dies at once, the group stays reserved
until the sweep ends, and the next trials wait for CPUs forever.

So the sweep's driver does it here: the workers report their placement group with every checkpoint
(`PLACEMENT_GROUP`), and once a finished trial's group holds no live actor (its workers went with their
controller) the group is removed. Removing it earlier would let the dying controller start a new worker group,
and leak that one.
"""

import logging
import time
from typing import Any

import ray
from ray import tune
from ray.util.placement_group import PlacementGroup, placement_group_table, remove_placement_group

log = logging.getLogger(__name__)

PLACEMENT_GROUP = "ray_placement_group"  # the reported metric: the hex id of the workers' placement group
CHECK_EVERY_S = 1.0


class ReleaseStoppedTrials(tune.Callback):
    def __init__(self) -> None:
        self._groups: dict[str, str] = {}  # trial id -> its workers' placement group
        self._finished: dict[str, str] = {}  # placement group -> trial name, of finished trials
        self._last_check = 0.0

    def on_trial_result(self, iteration: int, trials: list, trial: Any, result: dict, **info: Any) -> None:
        if group := result.get(PLACEMENT_GROUP):
            self._groups[trial.trial_id] = group

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._finish(trial)

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._finish(trial)

    def on_step_end(self, iteration: int, trials: list, **info: Any) -> None:
        if not self._finished or time.monotonic() - self._last_check < CHECK_EVERY_S:
            return
        self._last_check = time.monotonic()
        for group, trial_name in list(self._finished.items()):
            if self._release(group, trial_name):
                del self._finished[group]

    def _finish(self, trial: Any) -> None:
        if group := self._groups.pop(trial.trial_id, None):
            self._finished[group] = str(trial)

    def _release(self, group_id: str, trial_name: str) -> bool:
        """Removes the group once its actors are gone; whether nothing is left to do for it."""
        group = PlacementGroup(ray.PlacementGroupID.from_hex(group_id))
        if placement_group_table(group).get("state", "REMOVED") == "REMOVED":
            return True  # the controller ended the run itself
        if holds_actors(group_id):
            return False
        remove_placement_group(group)
        log.info(f"released the resources of {trial_name}'s workers")
        return True


def holds_actors(group_id: str) -> bool:
    """Whether an actor still holds a part of the placement group.

    Ray accounts for a group as resources named <resource>_group_<group id> (its bundles together), and every
    actor placed in it takes some (at least a sliver of `bundle`). Asked of the GCS through this driver's own
    connection: no state API, which would look for the cluster as Ray's cleaner does."""
    total, free = ray.cluster_resources(), ray.available_resources()
    suffix = f"_group_{group_id}"
    return any(free.get(name, 0.0) < amount for name, amount in total.items() if name.endswith(suffix))
