"""launcher=slurm: scripts rendered from the config, and jobs run on a real one-node SLURM cluster
(Debian's slurm-wlm and munge, started by scripts/slurm_local.sh)."""

import contextlib
import json
import re
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml
from helpers import REPO, TINY_DCGAN, last_step, run_cli
from wandb_offline import find_runs, read_run

pytestmark = pytest.mark.slow  # every test here starts a cluster or runs end to end

SLOW_DCGAN = [
    "+exp=dcgan",
    "data.batch_size=32",
    "task.generator_steps=1",  # two optimizer steps per batch: the step counts below
    "++trainer.limit_train_batches=6",
    "++trainer.limit_val_batches=1",
    "++trainer.max_epochs=8",
    "++trainer.enable_progress_bar=false",
]


@pytest.fixture(scope="module")
def slurm() -> None:
    started = subprocess.run(
        [str(REPO / "scripts" / "slurm_local.sh"), "start"], capture_output=True, text=True, timeout=600
    )
    if started.returncode != 0:
        pytest.skip(f"no SLURM cluster on this machine: {started.stdout.strip() or started.stderr.strip()}")
    yield
    subprocess.run(["scancel", "--user=root"], check=False)
    subprocess.run([str(REPO / "scripts" / "slurm_local.sh"), "stop"], check=False)


def submitted_job(result: subprocess.CompletedProcess) -> str:
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    (job,) = re.findall(r"submitted job (\d+)", result.stdout + result.stderr)
    return job


def job_field(job: str, name: str) -> str:
    shown = subprocess.run(["scontrol", "show", "job", job], capture_output=True, text=True).stdout
    match = re.search(rf"\b{name}=(\S+)", shown)
    return match[1] if match else ""


def wait_for_state(job: str, states: set[str], timeout: float) -> str:
    deadline = time.monotonic() + timeout
    while (state := job_field(job, "JobState")) not in states:
        assert time.monotonic() < deadline, f"job {job} still {state} after {timeout} s"
        time.sleep(1)
    return state


def test_dry_run_of_two_nodes_writes_a_script_that_starts_a_ray_cluster(tmp_path: Path, home: Path) -> None:
    run_dir = tmp_path / "run"
    result = run_cli(
        "+exp=dcgan",
        "launcher=slurm",
        "slurm.nodes=2",
        "slurm.dry_run=true",
        f"hydra.run.dir={run_dir}",
        home=home,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    script = (run_dir / "slurm" / "job.sbatch").read_text()
    for line in (
        "#SBATCH --nodes=2",
        "#SBATCH --requeue",
        "#SBATCH --signal=B:USR1@120",
        "ray start --head",
        "ray start --block --address=",
        "launcher.address=auto",
        "launcher.num_workers=2",
        f"hydra.run.dir={run_dir}",
    ):
        assert line in script, line
    (command,) = [line for line in script.splitlines() if " -m trainer " in line and not line.startswith("#")]
    assert "launcher=slurm" not in command and "slurm." not in command  # the job trains, it does not resubmit
    assert subprocess.run(["bash", "-n", str(run_dir / "slurm" / "job.sbatch")]).returncode == 0
    assert "ray start --head" in result.stdout  # the script is printed too
    assert_ports_never_collide(script)


def assert_ports_never_collide(script: str) -> None:
    """For every job id: the ports the script gives its Ray cluster stay out of its worker port range, and
    so do Ray's fixed defaults (job 80 once failed: the dashboard agent's 52365 lay in its worker range)."""
    ports = [
        line for line in script.splitlines() if line.startswith(("port=", "worker_ports=", "agent_port="))
    ]
    dashboard = re.search(r"--dashboard-port=(\$\(\(.*?\)\))", script)[1]
    probe = "\n".join(
        [
            "for SLURM_JOB_ID in $(seq 0 999); do",
            *ports,
            f'echo "$port {dashboard} ${{agent_port#*=}} ${{worker_ports//[^0-9 ]/}}"',
            "done",
        ]
    )
    lines = subprocess.run(
        ["bash", "-c", probe], capture_output=True, text=True, check=True
    ).stdout.splitlines()
    assert len(lines) == 1000
    for line in lines:
        gcs, dash, agent, low, high = map(int, line.split())
        for fixed in (gcs, dash, agent, 10001, 52365, 6379, 8265):
            assert not low <= fixed <= high, line


def test_one_node_script_carries_the_allocation(tmp_path: Path, home: Path) -> None:
    run_dir = tmp_path / "run"
    result = run_cli(
        "+exp=dcgan",
        "launcher=slurm",
        "slurm.gpus_per_node=4",
        "slurm.partition=gpu",
        "slurm.account=lab",
        "slurm.qos=high",
        "slurm.mem=64G",
        "slurm.time=12:00:00",
        "slurm.extra_sbatch=['--constraint=a100']",
        "slurm.setup=['module load cuda/12.4']",
        "slurm.dry_run=true",
        f"hydra.run.dir={run_dir}",
        home=home,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    script = (run_dir / "slurm" / "job.sbatch").read_text()
    for line in (
        "--ntasks-per-node=4",
        "--gpus-per-node=4",
        "--partition=gpu",
        "--account=lab",
        "--qos=high",
        "--mem=64G",
        "--time=12:00:00",
        "#SBATCH --constraint=a100",
        "\nmodule load cuda/12.4\n",
        "--signal=USR1@120",
        "srun --kill-on-bad-exit=1",
        "++trainer.devices=4",
        "++trainer.strategy=ddp",
    ):
        assert line in script, line


@pytest.mark.parametrize(
    "overrides,message",
    [
        (["slurm.gpus_per_node=8", "++trainer.devices=4"], "trainer.devices=4 but slurm.gpus_per_node=8"),
        (
            ["slurm.nodes=2", "slurm.gpus_per_node=8", "slurm.ray_workers=32"],
            "slurm.ray_workers=32 but 2 node(s) x 8",
        ),
        (["++slurm.gpus=8"], "slurm.gpus is not an option"),
    ],
)
def test_a_config_that_contradicts_the_allocation_is_refused(
    overrides, message, tmp_path: Path, home: Path
) -> None:
    result = run_cli(
        "+exp=dcgan",
        "launcher=slurm",
        "slurm.dry_run=true",
        *overrides,
        f"hydra.run.dir={tmp_path}",
        home=home,
    )
    assert result.returncode == 2 and message in result.stderr, result.stderr[-2000:]
    assert not (tmp_path / "slurm").exists()


def raylets(gcs_port: int) -> list[int]:
    """Live raylet processes of the Ray cluster whose GCS listens on `gcs_port` (read from /proc)."""
    pids = []
    for proc in Path("/proc").glob("[0-9]*"):
        with contextlib.suppress(OSError):
            args = (proc / "cmdline").read_bytes().split(b"\0")
            zombie = (proc / "stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
            if (
                args[0].endswith(b"/raylet")
                and not zombie
                and any(a.startswith(b"--gcs-address=") and a.endswith(b":%d" % gcs_port) for a in args)
            ):
                pids.append(int(proc.name))
    return pids


@contextlib.contextmanager
def another_ray_cluster() -> Iterator[int]:
    """A Ray cluster of the same user on this node, as another job's would be; yields its GCS port."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ray = str(Path(sys.executable).parent / "ray")
    proc = subprocess.Popen(
        [ray, "start", "--head", "--block", f"--port={port}", "--num-cpus=0", "--include-dashboard=false"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 60
        while not raylets(port):
            assert time.monotonic() < deadline and proc.poll() is None, "the other Ray cluster did not start"
            time.sleep(0.5)
        yield port
    finally:
        proc.terminate()
        proc.wait(timeout=60)


def test_a_tiny_exp_runs_through_the_ray_template(slurm, tmp_path: Path, home: Path) -> None:
    run_dir = tmp_path / "run"
    with another_ray_cluster() as other_port:
        result = run_cli(
            *TINY_DCGAN,
            "++trainer.max_epochs=1",
            "launcher=slurm",
            "slurm.via_ray=true",
            "slurm.ray_head_ip=127.0.0.1",
            f"hydra.run.dir={run_dir}",
            home=home,
        )
        job = submitted_job(result)
        assert wait_for_state(job, {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT"}, 300) == "COMPLETED", (
            run_dir / "slurm" / f"job-{job}.log"
        ).read_text()[-3000:]
        assert last_step(run_dir) == 8
        log = (run_dir / "slurm" / f"job-{job}.log").read_text()
        assert "Ray head" in log and len(find_runs(run_dir / "wandb")) == 1
        # The job stopped its own Ray cluster and no other (`ray stop` stops every one of the user's).
        job_port = int(re.search(r"Ray head \S+ \([\d.]+:(\d+)\)", log)[1])
        assert not raylets(job_port)
        assert raylets(other_port), "the job's end stopped another Ray cluster on its node"


def test_a_signalled_job_saves_requeues_and_finishes_all_its_steps(slurm, tmp_path: Path, home: Path) -> None:
    run_dir = tmp_path / "run"
    job = submitted_job(run_cli(*SLOW_DCGAN, "launcher=slurm", f"hydra.run.dir={run_dir}", home=home))
    deadline = time.monotonic() + 180
    while not (run_dir / "checkpoints" / "last.ckpt").exists():
        assert time.monotonic() < deadline and job_field(job, "JobState") in ("PENDING", "RUNNING")
        time.sleep(0.5)
    # What SLURM sends before a time limit or a preemption (--signal=USR1@...), sent now.
    subprocess.run(["scancel", "--signal=USR1", job], check=True)
    wait_for_state(job, {"PENDING"}, 120)
    # skip the requeue hold
    subprocess.run(["scontrol", "update", f"jobid={job}", "starttime=now"], check=True)
    assert wait_for_state(job, {"COMPLETED", "FAILED", "CANCELLED"}, 300) == "COMPLETED"
    assert job_field(job, "Restarts") == "1"
    log = (run_dir / "slurm" / f"job-{job}.log").read_text()
    assert "SIGUSR1 received, last.ckpt saved" in log and "Traceback" not in log
    # The first attempt closes (summary "preempted") before it requeues; the second resumes and finishes.
    order = ["── run preempted in", f"requeueing SLURM job {job}", "resuming from", "── run finished in"]
    assert [log.index(line) for line in order] == sorted(log.index(line) for line in order), log[-3000:]
    assert last_step(run_dir) == 8 * 6 * 2  # every step, once
    runs = [read_run(p, strict=False) for p in find_runs(run_dir / "wandb")]
    assert len(runs) == 2 and len({r.run_id for r in runs}) == 1  # the requeued job continued the W&B run


def test_a_sweep_file_runs_as_a_job_array(slurm, tmp_path: Path, home: Path) -> None:
    sweep = tmp_path / "runs.txt"
    sweep.write_text("seed=1 task.lr=1e-4\nseed=2 task.lr=3e-4\n")
    run_dir = tmp_path / "sweep"
    result = run_cli(
        *TINY_DCGAN,
        "++trainer.max_epochs=1",
        "logger=none",
        "launcher=slurm",
        "slurm.cpus_per_task=1",
        f"slurm.sweep_file={sweep}",
        f"hydra.run.dir={run_dir}",
        home=home,
    )
    job = submitted_job(result)
    deadline = time.monotonic() + 300
    while not all((run_dir / str(i) / "checkpoints" / "last.ckpt").exists() for i in (0, 1)):
        assert time.monotonic() < deadline, "the array's runs did not finish"
        time.sleep(1)
    configs = [yaml.safe_load((run_dir / str(i) / "config.yaml").read_text()) for i in (0, 1)]
    assert [c["seed"] for c in configs] == [1, 2] and [c["task"]["lr"] for c in configs] == [1e-4, 3e-4]
    assert {c["model"]["generator"]["width"] for c in configs} == {
        8
    }  # the submitting command's overrides too
    wait_until_gone(job, 120)


def wait_until_gone(job: str, timeout: float) -> None:
    """Until SLURM has let go of the job (and its CPUs) entirely."""
    deadline = time.monotonic() + timeout
    while subprocess.run(["squeue", "-h", "-j", job], capture_output=True, text=True).stdout.strip():
        assert time.monotonic() < deadline, f"job {job} still queued after {timeout} s"
        time.sleep(0.5)


def test_a_multirun_sweep_through_hydras_submitit_launcher(slurm, tmp_path: Path, home: Path) -> None:
    sweep_dir = tmp_path / "sweep"
    result = run_cli(
        "-m",
        *TINY_DCGAN,
        "++trainer.max_epochs=1",
        "logger=none",
        "hydra/launcher=submitit_slurm",
        "hydra.launcher.timeout_min=10",
        "hydra.launcher.cpus_per_task=1",
        "seed=1,2",
        f"hydra.sweep.dir={sweep_dir}",
        home=home,
        timeout=400,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    for trial in ("0", "1"):
        assert (sweep_dir / trial / "checkpoints" / "last.ckpt").is_file()
        assert json.loads((sweep_dir / trial / "metrics.json").read_text())["train/loss_d"]["final"] > 0
        # submitit owns requeueing on its USR2; Lightning's own SLURM requeue handler stays off.
        assert "auto-requeueing enabled" not in (sweep_dir / trial / "train.log").read_text()


def test_an_optuna_sweep_runs_each_batch_of_trials_as_a_job_array(slurm, tmp_path: Path, home: Path) -> None:
    sweep_dir = tmp_path / "sweep"
    result = run_cli(
        "-m",
        *TINY_DCGAN,
        "++trainer.max_epochs=1",
        "logger=none",
        "hparams_search=dcgan_optuna",
        "hydra.sweeper.n_trials=2",
        "hydra.sweeper.n_jobs=2",
        "hydra/launcher=submitit_slurm",
        "hydra.launcher.timeout_min=10",
        "hydra.launcher.cpus_per_task=1",
        f"hydra.sweep.dir={sweep_dir}",
        home=home,
        timeout=400,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    for trial in ("0", "1"):
        assert json.loads((sweep_dir / trial / "trial.json").read_text())["status"] == "completed"
    # One array of two tasks: submitit's folders are <array job id>_<task index>.
    folders = sorted(p.name for p in (sweep_dir / ".submitit").iterdir() if re.fullmatch(r"\d+_\d+", p.name))
    assert len(folders) == 2 and len({f.split("_")[0] for f in folders}) == 1, folders
    best = yaml.safe_load((sweep_dir / "best.yaml").read_text())
    assert best["trial"] in ("0", "1") and "trial" in (sweep_dir / "results.csv").read_text()


def test_a_tune_sweep_runs_as_one_job_on_a_ray_cluster_in_the_allocation(
    slurm, tmp_path: Path, home: Path
) -> None:
    run_dir = tmp_path / "sweep"
    # Each trial a two-worker Ray Train run (DDP), one trial at a time on the job's two CPUs.
    result = run_cli(
        *TINY_DCGAN,
        "++trainer.max_epochs=1",
        "logger=none",
        "hparams_search=dcgan_asha",
        "tune.num_samples=2",
        "tune.scheduler=fifo",
        "tune.workers_per_trial=2",
        "tune.max_concurrent=1",
        "launcher=slurm",
        "slurm.ray_head_ip=127.0.0.1",
        f"hydra.run.dir={run_dir}",
        home=home,
    )
    job = submitted_job(result)
    state = wait_for_state(job, {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT"}, 400)
    log = (run_dir / "slurm" / f"job-{job}.log").read_text()
    assert state == "COMPLETED", log[-3000:]
    assert "Ray head" in log and "trial-00001" in log
    # Ray's own lines (its workers setting up their process group) go to the sweep's train.log.
    assert (run_dir / "train.log").read_text().count("world_size=2]") == 2
    for trial in ("trial-00000", "trial-00001"):
        assert json.loads((run_dir / trial / "trial.json").read_text())["status"] == "completed"
        assert last_step(run_dir / trial) == 8
    assert (run_dir / "best_config.yaml").is_file()
    wait_until_gone(job, 120)
