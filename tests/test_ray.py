"""launcher=ray on real Ray clusters on loopback: a local one, and a three-node one on this machine."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from helpers import TINY_DCGAN, TINY_QA, cli_env, last_step, run_cli
from wandb_offline import find_runs, read_run

pytestmark = pytest.mark.slow  # every test here starts a cluster or runs end to end

RAY = ["launcher=ray", "launcher.num_workers=2"]
# Big enough that a step takes tens of milliseconds, so a worker can be killed in the middle of training.
SLOW_DCGAN = [
    "+exp=dcgan",
    "data.batch_size=32",
    "task.generator_steps=1",  # two optimizer steps per batch: the step counts below
    "++trainer.limit_train_batches=6",
    "++trainer.limit_val_batches=1",
    "++trainer.max_epochs=6",
    "++trainer.log_every_n_steps=2",
    "++trainer.enable_progress_bar=false",
    "callbacks.last_checkpoint.every_n_train_steps=4",  # every 2 batches (2 optimizer steps per batch)
]


@pytest.fixture(scope="module")
def cluster():
    """A head and two more nodes of one CPU each, as separate raylets on 127.0.0.1."""
    from ray.cluster_utils import Cluster

    head = {"num_cpus": 1, "include_dashboard": False, "node_ip_address": "127.0.0.1"}
    ray_cluster = Cluster(initialize_head=True, head_node_args=head)
    for _ in range(2):
        ray_cluster.add_node(num_cpus=1, node_ip_address="127.0.0.1")
    ray_cluster.wait_for_nodes()
    yield ray_cluster
    ray_cluster.shutdown()


def start_cli(*args: str, home: Path) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "trainer", *args],
        env=cli_env(home),
        cwd=Path(__file__).parent.parent,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def wait_for(condition, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)


def train_workers(cluster) -> dict[int, object]:
    """Ray Train worker pid -> the cluster node whose raylet started it (read from /proc)."""
    raylets = {node.all_processes["raylet"][0].process.pid: node for node in cluster.list_all_nodes()}
    workers = {}
    for proc in Path("/proc").iterdir():
        try:
            title = (proc / "cmdline").read_bytes()
            parent = int((proc / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        if b"RayTrainWorker" in title and parent in raylets:
            workers[int(proc.name)] = raylets[parent]
    return workers


def ray_checkpoints(run_dir: Path) -> list[Path]:
    return list(run_dir.glob("ray/*/checkpoint_*/last.ckpt"))


def registered_checkpoints(run_dir: Path) -> list[str]:
    """The checkpoints Ray Train has registered, once every worker reported: what a restart resumes from.
    (Rank 0's upload makes the folder earlier; a worker killed before it reported leaves that one unused.)"""
    names = []
    for snapshot in run_dir.glob("ray/*/checkpoint_manager_snapshot.json"):
        try:
            results = json.loads(snapshot.read_text())["checkpoint_results"]
        except (ValueError, KeyError):  # being written
            continue
        names += [result["checkpoint_dir_name"] for result in results]
    return names


def test_ray_run_writes_the_run_dir_and_resumes(tmp_path: Path, home: Path) -> None:
    run_dir = tmp_path / "run"
    first = run_cli(*TINY_DCGAN, *RAY, "++trainer.max_epochs=1", f"hydra.run.dir={run_dir}", home=home)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    assert last_step(run_dir) == 8  # 4 batches per worker, 2 optimizers
    assert ray_checkpoints(run_dir)  # also reported to Ray Train
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert "train/loss_d" in metrics and "val/pixel_fd" in metrics
    (wandb_run,) = find_runs(run_dir / "wandb")  # exactly one W&B run: rank 0's
    run = read_run(wandb_run)
    assert "grad_norm/generator/total" in run.history_keys()

    second = run_cli(*TINY_DCGAN, *RAY, "++trainer.max_epochs=2", f"hydra.run.dir={run_dir}", home=home)
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    assert "resuming from" in second.stdout + second.stderr
    assert last_step(run_dir) == 16
    assert {read_run(p).run_id for p in find_runs(run_dir / "wandb")} == {run.run_id}


def test_a_halt_on_ray_ends_in_one_line_and_is_not_retried(tmp_path: Path, home: Path) -> None:
    """The guard halts both workers alike: the launch ends as a halted run does locally (exit 2, one
    `error:` line with the bundle), and Ray does not restart the workers only for them to halt again."""
    run_dir = tmp_path / "run"
    halted = run_cli(
        *TINY_DCGAN,
        *RAY,
        "divergence.inject.step=2",
        "divergence.action=halt",
        f"hydra.run.dir={run_dir}",
        home=home,
    )
    output = halted.stdout + halted.stderr
    assert halted.returncode == 2 and "Traceback" not in output, output[-3000:]
    assert halted.stderr.splitlines()[-1].startswith("error: divergence at step 2: non-finite gradients")
    assert "resuming from" not in output and "RETRY" not in (run_dir / "train.log").read_text()
    assert (run_dir / "summary.txt").read_text().startswith("── run stopped by the divergence guard")


def test_the_console_shows_the_run_and_train_log_keeps_what_ray_said(tmp_path: Path, home: Path) -> None:
    """No line of Ray's own processes on the console, no `(pid=...)` prefix, no "Loading weights" bar from
    each worker; the workers' lines and warnings still come through, and train.log keeps what Ray said."""
    run_dir = tmp_path / "run"
    # A logging interval longer than the epoch: Lightning warns about it on rank 0, a worker's warning.
    done = run_cli(*TINY_QA, *RAY, "++trainer.log_every_n_steps=50", f"hydra.run.dir={run_dir}", home=home)
    console = done.stdout + done.stderr
    assert done.returncode == 0, console[-4000:]
    for noise in ("Traceback", "Loading weights", "PlacementGroupCleaner", "TrainController", "pid="):
        assert noise not in console, f"{noise!r} on the console:\n{console[-4000:]}"
    lines = done.stderr.splitlines()
    assert any(line.startswith("trainer: run dir") for line in lines)  # rank 0's lines, from its worker
    assert any(line.startswith("warning: ") and "logging interval" in line for line in lines)
    assert any(line.startswith("── run finished") for line in lines)  # the driver's summary
    logged = (run_dir / "train.log").read_text()
    assert "ray.processes: (TrainController pid=" in logged and "ray.processes: Ray session /" in logged


def train_through_a_failure(cluster, run_dir: Path, home: Path, fail, *args: str) -> str:
    """Starts a spread 2-worker run on the cluster, calls `fail` once Ray holds a checkpoint, and returns
    the output of the run, which must finish all its steps."""
    proc = start_cli(
        *SLOW_DCGAN,
        *RAY,
        *args,
        f"launcher.address={cluster.address}",
        "launcher.placement_strategy=SPREAD",
        f"hydra.run.dir={run_dir}",
        home=home,
    )
    try:
        wait_for(
            lambda: registered_checkpoints(run_dir) or proc.poll() is not None, 180, "a first Ray checkpoint"
        )
        assert proc.poll() is None, proc.stdout.read()[-3000:]
        workers = train_workers(cluster)
        assert len(workers) == 2 and len(set(workers.values())) == 2  # SPREAD: one worker per node
        fail(workers)
        output, _ = proc.communicate(timeout=300)
    finally:
        proc.kill()
    assert proc.returncode == 0, output[-4000:]
    assert last_step(run_dir) == 6 * 6 * 2  # all the configured steps, no more
    assert "resuming from" in output and "/ray/" in output  # restarted from the reported checkpoint
    return output


def test_a_killed_worker_is_replaced_and_training_continues(cluster, tmp_path: Path, home: Path) -> None:
    """Under DiLoCo, with the kill between two syncs (checkpoints every 4 steps, a sync at each epoch's
    validation, every 12): the new worker group starts from the checkpoint, which holds the last synchronised
    weights and every worker's own (`losing a node` below is the same under all-reduce)."""
    run_dir = tmp_path / "run"

    def kill_one(workers: dict) -> None:
        os.kill(next(iter(workers)), signal.SIGKILL)

    train_through_a_failure(
        cluster, run_dir, home, kill_one, "distributed.sync=diloco", "distributed.sync_every=50"
    )
    sync = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)["callbacks"]["WorkerSync"]
    assert sync["outer_steps"] == 6 and sync["synced_at"] == 72  # one per epoch, none twice or lost
    # The first W&B run file ends where its process was killed, perhaps before its run record (W&B writes an
    # offline log in 32 KiB blocks): read what it holds, in the order the folders' names give.
    runs = [read_run(p, strict=False) for p in find_runs(run_dir / "wandb")]
    assert len(runs) == 2 and len({r.run_id for r in runs}) == 1  # the restart continued the same W&B run
    resumed_at = min(step for _, step in runs[1].series("trainer/global_step"))
    assert resumed_at > 0  # only the steps after the checkpoint were done again


def test_losing_a_node_is_survived(cluster, tmp_path: Path, home: Path) -> None:
    def remove_a_busy_node(workers: dict) -> None:
        cluster.remove_node(next(n for n in cluster.worker_nodes if n in set(workers.values())))

    try:
        train_through_a_failure(cluster, tmp_path / "run", home, remove_a_busy_node)
    finally:
        cluster.add_node(num_cpus=1, node_ip_address="127.0.0.1")  # the next test gets three nodes again
        cluster.wait_for_nodes()


def test_two_ray_workers_match_two_ddp_processes(tmp_path: Path, home: Path) -> None:
    """Same seed, same global batch: the loss curves of Ray Train and Lightning's own DDP agree."""
    ray_dir, ddp_dir = tmp_path / "ray", tmp_path / "ddp"
    common = [*TINY_DCGAN, "++trainer.max_epochs=2", "++trainer.log_every_n_steps=1"]
    ray_run = run_cli(*common, *RAY, f"hydra.run.dir={ray_dir}", home=home)
    assert ray_run.returncode == 0, ray_run.stdout[-3000:] + ray_run.stderr[-3000:]
    ddp_run = run_cli(*common, "trainer=ddp_cpu", f"hydra.run.dir={ddp_dir}", home=home)
    assert ddp_run.returncode == 0, ddp_run.stderr[-3000:]

    def curve(run_dir: Path, key: str) -> torch.Tensor:
        (path,) = find_runs(run_dir / "wandb")
        return torch.tensor([v for _, v in read_run(path).series(key)])

    for key in ("train/loss_d", "train/loss_g"):
        ray_curve, ddp_curve = curve(ray_dir, key), curve(ddp_dir, key)
        assert len(ray_curve) == len(ddp_curve) == 8
        torch.testing.assert_close(ray_curve, ddp_curve, rtol=1e-4, atol=1e-5)  # the stated tolerance


def test_unreachable_cluster_fails_fast_with_the_address(home: Path) -> None:
    started = time.monotonic()
    result = run_cli(*TINY_DCGAN, *RAY, "launcher.address=127.0.0.1:9", home=home)
    assert result.returncode == 2 and time.monotonic() - started < 30
    assert "error: cannot reach the Ray cluster at launcher.address=127.0.0.1:9" in result.stderr


def test_asking_for_more_cpus_than_the_cluster_has_fails_fast(cluster, home: Path) -> None:
    result = run_cli(
        *TINY_DCGAN, *RAY, "launcher.num_workers=8", f"launcher.address={cluster.address}", home=home
    )
    assert result.returncode == 2, result.stderr[-2000:]
    assert "needs 8 CPU, the Ray cluster has 3" in result.stderr
