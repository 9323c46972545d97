"""Local SGD and DiLoCo (trainer/distributed/sync.py) on 2 CPU processes and on Ray: the same training as
all-reduce
at H=1, H times fewer bytes at H>1, exact resume after a kill between syncs, one decision of the guard on
every worker; and the non-IID split of the training data (`data.partition=by_class`)."""

import json
import re
from pathlib import Path

import pytest
import torch
from helpers import (
    SHORT_PPO,
    TINY_DCGAN,
    assert_clean_failure,
    assert_same_training_state,
    compose_config,
    divergence_events,
    kill_at_first_checkpoint,
    last_checkpoint,
    last_step,
    run_cli,
    run_own,
)
from wandb_offline import find_runs, read_run

from trainer.data import loading
from trainer.data.coco import CocoDetection
from trainer.data.digit_canvases import write_digit_canvases
from trainer.data.loading import ShardedSampler
from trainer.errors import UserError
from trainer.run import train

DILOCO = ["trainer=ddp_cpu", "distributed.sync=diloco"]


def metric(run_dir: Path, name: str) -> float:
    return json.loads((run_dir / "metrics.json").read_text())[name]["final"]


def outer_state(run_dir: Path) -> dict:
    return torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)["callbacks"]["WorkerSync"]


def weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]


# -- the non-IID split -------------------------------------------------------------------------------------


def shards(sampler: ShardedSampler, world: int, monkeypatch: pytest.MonkeyPatch) -> list[list[int]]:
    out = []
    for rank in range(world):
        monkeypatch.setattr(loading, "rank_and_world", lambda rank=rank: (rank, world))
        out.append(list(sampler))
    return out


@pytest.mark.parametrize("world", [2, 3, 4])
def test_by_class_gives_each_worker_its_own_classes_in_equal_counts(world: int, monkeypatch):
    classes = torch.randint(0, 10, (997,), generator=torch.Generator().manual_seed(world)).tolist()
    parts = shards(ShardedSampler(len(classes), seed=1, classes=classes), world, monkeypatch)
    seen = [{classes[i] for i in part} for part in parts]
    assert all(a.isdisjoint(b) for i, a in enumerate(seen) for b in seen[i + 1 :])  # no class on two workers
    assert set().union(*seen) == set(range(10))  # and none left out
    assert len({len(part) for part in parts}) == 1 and len(parts[0]) > 0  # the same number of steps
    iid = shards(ShardedSampler(len(classes), seed=1), world, monkeypatch)
    assert all(len({classes[i] for i in part}) == 10 for part in iid)  # iid: every worker sees every class


def test_by_class_refuses_more_workers_than_classes(monkeypatch):
    monkeypatch.setattr(loading, "rank_and_world", lambda: (0, 3))
    with pytest.raises(Exception, match="2 classes cannot be split over 3 workers"):
        list(ShardedSampler(10, seed=0, classes=[0, 1] * 5))


def test_detection_images_take_the_class_most_of_their_boxes_have(tmp_path: Path):
    write_digit_canvases(tmp_path, train_images=30, val_images=2, seed=0)
    data = CocoDetection(tmp_path / "annotations" / "train.json", tmp_path / "train")
    for index, image_class in enumerate(data.classes):
        labels = data[index][1]["labels"].tolist()
        if not labels:
            assert image_class == -1
            continue
        top = max(labels.count(c) for c in set(labels))
        assert image_class == min(c for c in set(labels) if labels.count(c) == top)


def test_bad_sync_settings_fail_in_one_line(tmp_path: Path, home: Path):
    result = run_cli(*TINY_DCGAN, "logger=none", "distributed.sync=gossip", home=home)  # the CLI's exit
    assert_clean_failure(
        result,
        "distributed.sync='gossip' has the wrong type: expected one of 'allreduce', 'local_sgd', 'diloco'",
    )
    for args, fragment in (  # the same UserError path, in-process
        (["distributed.sync=diloco"], "distributed.sync=diloco averages data-parallel workers: use trainer="),
        (["distributed.sync=local_sgd", "distributed.sync_every=0"], "distributed.sync_every=0"),
        (["data.partition=by_digit"], "data.partition='by_digit' has the wrong type: expected one of 'iid'"),
        (  # one setting, one place: the strategy takes it from the distributed node
            ["trainer=ddp_cpu", "+trainer.strategy.sync=local_sgd"],
            "trainer.strategy.sync is a distributed setting: set distributed.sync instead",
        ),
    ):
        with pytest.raises(UserError, match=re.escape(fragment)):
            train(compose_config(*TINY_DCGAN, "logger=none", *args, run_dir=tmp_path / "run"))


# -- training on 2 processes -------------------------------------------------------------------------------

SGD = ["task.lr=0.05", "task.momentum=0.9", "++trainer.max_steps=12", "++trainer.log_every_n_steps=1"]


@pytest.mark.slow
def test_h1_with_a_plain_outer_step_is_allreduce_and_h4_sends_a_quarter(tmp_path: Path, home: Path):
    """Averaging the replicas after every step of SGD with momentum is averaging the gradients: the weights
    agree to float rounding. Between syncs nothing is sent."""
    runs = {
        "allreduce": ["trainer=ddp_cpu"],
        "h1": [*DILOCO, "distributed.sync_every=1", "distributed.outer.lr=1", "distributed.outer.momentum=0"],
        "h4": [*DILOCO, "distributed.sync_every=4", "++trainer.limit_val_batches=0"],
    }
    for name, options in runs.items():
        result = run_own(*SGD, "logger=csv", *options, f"hydra.run.dir={tmp_path / name}", home=home)
        assert result.returncode == 0, result.stderr[-3000:]
    allreduce, h1 = weights(tmp_path / "allreduce"), weights(tmp_path / "h1")
    moved = sum(float((allreduce[k] - weights(tmp_path / "h4")[k]).abs().sum()) for k in allreduce)
    assert moved > 0  # the runs differ at H=4 (a sync that did nothing would leave them equal at H=1 too)
    for key in allreduce:
        torch.testing.assert_close(h1[key], allreduce[key], rtol=1e-5, atol=1e-6)
    # DDP all-reduces every gradient (one float32 per parameter) at each of the 12 steps; the replicas'
    # parameters (the MLP has no buffers) go at every step at H=1, at every 4th at H=4.
    parameters = sum(w.numel() for w in allreduce.values())
    assert metric(tmp_path / "allreduce", "comm/bytes") == 12 * parameters * 4
    assert metric(tmp_path / "h1", "comm/bytes") == 12 * parameters * 4
    assert metric(tmp_path / "h4", "comm/bytes") == 3 * parameters * 4
    assert metric(tmp_path / "h4", "sync/outer_step") == 3


@pytest.mark.slow
@pytest.mark.parametrize("workers", [1, 2])
def test_workers_meet_every_h_optimizer_steps_also_within_a_ppo_rollout(tmp_path: Path, home: Path, workers):
    """A PPO Lightning step plays a rollout and takes 16 optimizer steps on it (4 epochs of 4 minibatches);
    H=5 counts those. One worker runs DiLoCo's outer optimizer on its own changes."""
    run_dir = tmp_path / "run"
    result = run_cli(
        *SHORT_PPO,
        f"task.total_env_steps={1024 * workers}",
        f"task.env_steps_per_epoch={512 * workers}",  # 2 epochs of one rollout per worker
        *DILOCO,
        f"++trainer.devices={workers}",
        "distributed.sync_every=5",
        f"hydra.run.dir={run_dir}",
        home=home,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert last_step(run_dir) == 32
    sync = outer_state(run_dir)
    # At steps 5, 10, 15, 16 (the validation), 21, 26, 31 and 32.
    assert sync["outer_steps"] == 8 and sync["synced_at"] == 32
    assert sync["outer"]["state"]  # the outer optimizer's momentum
    parameters = sum(a.numel() for a in sync["anchor"])  # the actor-critic has no buffers
    assert sync["bytes_sent"] == 8 * parameters * 4


@pytest.mark.slow
def test_a_diloco_run_killed_between_syncs_resumes_to_the_uninterrupted_weights(tmp_path: Path, home: Path):
    args = [
        *TINY_DCGAN,
        "++trainer.max_epochs=3",
        "callbacks.last_checkpoint.every_n_train_steps=6",  # 3 batches: between the syncs (every 8 steps)
        *DILOCO,
        "distributed.sync_every=8",
        "logger=none",
    ]
    straight = run_cli(*args, f"hydra.run.dir={tmp_path / 'straight'}", home=home, timeout=400)
    assert straight.returncode == 0, straight.stderr[-3000:]

    run_dir = tmp_path / "killed"
    kill_at_first_checkpoint(*args, run_dir=run_dir, home=home)
    assert last_step(run_dir) == 6
    state = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)
    sync = state["callbacks"]["WorkerSync"]
    assert sync["synced_at"] == 0 and sync["outer_steps"] == 0 and len(sync["anchor"]) > 0  # before a sync
    (rank1,) = state["worker_states"]  # rank 1's own weights, which differ from rank 0's between syncs
    assert any(not torch.equal(rank1["state_dict"][k], v) for k, v in state["state_dict"].items())

    resumed = run_cli(*args, f"hydra.run.dir={run_dir}", home=home, timeout=400)
    assert resumed.returncode == 0 and "resuming from" in resumed.stderr, resumed.stderr[-3000:]
    assert_same_training_state(last_checkpoint(tmp_path / "straight"), last_checkpoint(run_dir))


@pytest.mark.slow
def test_a_step_checkpoint_on_an_epochs_last_batch_is_written_after_the_epochs_validation(
    tmp_path: Path, home: Path
):
    """Every validation is a sync. A checkpoint written before the epoch's validation resumed past it without
    running it (Lightning counts it as done): the resumed run missed that sync, and every run's final
    checkpoint missed the last one."""
    args = [
        *TINY_DCGAN,
        "++trainer.max_epochs=3",
        "callbacks.last_checkpoint.every_n_train_steps=8",  # 4 batches: each epoch's last
        *DILOCO,
        "distributed.sync_every=100",  # only the validations sync
        "logger=none",
    ]
    straight = run_cli(*args, f"hydra.run.dir={tmp_path / 'straight'}", home=home, timeout=400)
    assert straight.returncode == 0, straight.stderr[-3000:]
    assert outer_state(tmp_path / "straight")["outer_steps"] == 3  # the final checkpoint holds the last sync

    run_dir = tmp_path / "killed"
    kill_at_first_checkpoint(*args, run_dir=run_dir, home=home)
    assert last_step(run_dir) == 8 and outer_state(run_dir)["outer_steps"] == 1  # after the first validation
    resumed = run_cli(*args, f"hydra.run.dir={run_dir}", home=home, timeout=400)
    assert resumed.returncode == 0 and "resuming from" in resumed.stderr, resumed.stderr[-3000:]
    assert_same_training_state(last_checkpoint(tmp_path / "straight"), last_checkpoint(run_dir))


@pytest.mark.slow
def test_a_step_checkpoint_followed_by_a_validation_within_the_epoch_is_written_again_after_it(
    tmp_path: Path, home: Path
):
    args = [
        *TINY_DCGAN,
        "++trainer.val_check_interval=2",  # batches: validations (and syncs) at steps 4 and 8
        "callbacks.last_checkpoint.every_n_train_steps=4",
        *DILOCO,
        "distributed.sync_every=100",
        "logger=none",
    ]
    straight = run_cli(*args, "++trainer.max_steps=8", f"hydra.run.dir={tmp_path / 'straight'}", home=home)
    assert straight.returncode == 0, straight.stderr[-3000:]
    run_dir = tmp_path / "halves"
    first = run_cli(*args, "++trainer.max_steps=4", f"hydra.run.dir={run_dir}", home=home)
    assert first.returncode == 0, first.stderr[-3000:]
    sync = outer_state(run_dir)
    assert sync["synced_at"] == 4 and sync["outer_steps"] == 1  # saved again after step 4's validation
    second = run_cli(*args, "++trainer.max_steps=8", f"hydra.run.dir={run_dir}", home=home)
    assert second.returncode == 0 and "resuming from" in second.stderr, second.stderr[-3000:]
    assert_same_training_state(last_checkpoint(tmp_path / "straight"), last_checkpoint(run_dir))


@pytest.mark.slow
def test_a_rollback_returns_to_the_last_sync_and_outer_optimizer_of_its_snapshot(tmp_path: Path, home: Path):
    """The guard's snapshot at step 6 (2 steps past the sync at 4) is restored at step 10 (2 past the sync at
    8) by a rollback: the workers' own weights and optimizers, and the parameters of the sync at 4 with
    the outer optimizer of then. The sync at 8 is undone with the rest; the next comes 2 steps later."""
    args = [
        *TINY_DCGAN,
        "++trainer.limit_train_batches=8",  # one epoch, 16 steps, no validation before step 16
        "++trainer.max_epochs=1",
        *DILOCO,
        "distributed.sync_every=4",  # at the ends of batches 2, 4, ...
        "divergence.nonfinite.action=rollback",
        "divergence.rollback.snapshot_every=3",  # snapshots after batches 3 and 6 (step 6 and 12)
        "logger=none",
    ]
    snapshot, rolled = tmp_path / "snapshot", tmp_path / "rolled"
    every_6 = "callbacks.last_checkpoint.every_n_train_steps=6"
    kill_at_first_checkpoint(*args, every_6, run_dir=snapshot, home=home)
    kill_at_first_checkpoint(
        *args,
        "divergence.inject.step=4",  # a NaN batch: steps 9 and 10, the discriminator's update dropped
        "callbacks.last_checkpoint.every_n_train_steps=10",
        run_dir=rolled,
        home=home,
    )
    events = divergence_events(rolled, 0)
    assert events and all(e["step"] == 4 and e["action"] == "rollback" for e in events), events
    before, after = last_checkpoint(snapshot), last_checkpoint(rolled)
    assert (before["global_step"], after["global_step"]) == (6, 10)
    sync_before, sync_after = before["callbacks"]["WorkerSync"], after["callbacks"]["WorkerSync"]
    assert (sync_before["synced_at"], sync_after["synced_at"]) == (4, 8)
    assert (sync_before["outer_steps"], sync_after["outer_steps"]) == (1, 2)  # a count, as global_step
    for a, b in zip(sync_before["anchor"], sync_after["anchor"], strict=True):
        assert torch.equal(a, b)
    assert sync_before["outer"]["state"]  # momentum from the sync at 4
    for param, state in sync_before["outer"]["state"].items():
        assert torch.equal(state["momentum_buffer"], sync_after["outer"]["state"][param]["momentum_buffer"])
    for own_before, own_after in [(before, after), (before["worker_states"][0], after["worker_states"][0])]:
        for key, value in own_before["state_dict"].items():
            assert torch.equal(value, own_after["state_dict"][key]), key
        for opt_before, opt_after in zip(own_before["optimizer_states"], own_after["optimizer_states"]):
            for param, state in opt_before["state"].items():
                assert torch.equal(state["exp_avg_sq"], opt_after["state"][param]["exp_avg_sq"])


@pytest.mark.slow
def test_a_nan_on_one_worker_between_syncs_halts_every_worker(tmp_path: Path, home: Path):
    """Between syncs the workers' gradients differ; the guard reads the largest, so all of them stop."""
    run_dir = tmp_path / "run"
    result = run_cli(
        *TINY_DCGAN,
        *DILOCO,
        "distributed.sync_every=50",
        "divergence.inject.step=3",
        "divergence.inject.rank=1",
        "divergence.action=halt",
        f"hydra.run.dir={run_dir}",
        "logger=none",
        home=home,
        timeout=300,
    )
    assert result.returncode != 0
    assert "error: divergence at step 3: non-finite gradients in discriminator" in result.stderr
    keys = ("step", "detector", "action", "series")
    rank0, rank1 = ([{k: e[k] for k in keys} for e in divergence_events(run_dir, rank)] for rank in (0, 1))
    assert rank0 == rank1 and rank0[0]["step"] == 3 and rank0[0]["action"] == "halt"


@pytest.mark.slow
def test_ray_workers_train_with_diloco_on_their_own_classes_to_a_checkpoint_that_resumes(
    tmp_path: Path, home: Path
):
    run_dir = tmp_path / "run"
    args = [
        *TINY_DCGAN,
        "launcher=ray",
        "launcher.num_workers=2",
        "distributed.sync=diloco",
        "distributed.sync_every=3",  # optimizer steps: a GAN takes two per batch
        "data.partition=by_class",
        f"hydra.run.dir={run_dir}",
    ]
    first = run_cli(*args, "++trainer.max_epochs=1", home=home, timeout=600)
    assert first.returncode == 0, first.stderr[-3000:]
    assert last_step(run_dir) == 8  # 4 batches
    sync = outer_state(run_dir)
    assert sync["outer_steps"] == 2 and sync["synced_at"] == 8 and sync["outer"]["state"]  # at steps 4 and 8
    sent = metric(run_dir, "comm/bytes")
    assert sent > 0
    (offline,) = find_runs(run_dir / "wandb")  # W&B has the outer steps and the bytes, as logged
    logged = read_run(offline)
    outer_steps = [value for _, value in logged.series("sync/outer_step")]
    sent_so_far = [value for _, value in logged.series("comm/bytes")]
    assert outer_steps == sorted(outer_steps) and 1 <= outer_steps[-1] <= 2, outer_steps
    assert sent_so_far == sorted(sent_so_far) and sent_so_far[-1] == sent, sent_so_far

    again = run_cli(*args, "++trainer.max_epochs=2", home=home, timeout=600)
    assert again.returncode == 0 and "resuming from" in again.stdout + again.stderr, again.stderr[-3000:]
    assert last_step(run_dir) == 16 and outer_state(run_dir)["outer_steps"] == 4
    assert metric(run_dir, "comm/bytes") == 2 * sent  # the count goes on over the resume
