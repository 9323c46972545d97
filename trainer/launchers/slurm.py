"""Submits the job to SLURM instead of running it: renders an sbatch script from the composed config into the
run dir, checks it with `sbatch --test-only`, submits it, and prints the job id and log path.

- One node: slurm/single_node.sbatch, one srun task per GPU running `launcher=local` (Lightning DDP over
  SLURM's tasks).
- Several nodes, or a Ray Tune sweep (mode=tune): slurm/ray_multi_node.sbatch starts a Ray cluster in the
  allocation and runs the command with `launcher=ray launcher.address=auto`.
- A list of runs (`slurm.sweep_file`): slurm/array.sbatch, one array task per line.
Settings live under the top-level `slurm:` node (conf/launcher/slurm.yaml).
"""

import logging
import re
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from string import Template
from typing import Annotated, Any

from omegaconf import DictConfig, OmegaConf

from trainer.config.build import check_arguments
from trainer.config.plain import plain_dict
from trainer.config.ranges import Interval, NonNegative, Positive, SlurmTime
from trainer.config.resume import refuse_changed_config
from trainer.errors import UserError

log = logging.getLogger(__name__)

# Overrides that describe where the job runs, not what it trains: replaced in the job's own command.
WHERE = re.compile(r"^[+~]*(launcher|slurm|hydra\.run\.dir|hydra/launcher)([.=/]|$)")


@dataclass
class SlurmJob:
    nodes: Positive = 1
    gpus_per_node: NonNegative = 0
    cpus_per_task: Positive = 2
    mem: str | None = None
    partition: str | None = None
    time: SlurmTime = "01:00:00"
    account: str | None = None
    qos: str | None = None
    job_name: str | None = None
    # more "#SBATCH ..." lines, e.g. "--constraint=a100"
    extra_sbatch: list[str] = field(default_factory=list)
    setup: list[str] = field(default_factory=list)  # shell lines before training: modules, environments
    signal_seconds: Annotated[int, Interval(1, 65535)] = 120  # warning before the time limit: save, requeue
    via_ray: bool | None = None  # run through a Ray cluster in the allocation; None: when nodes > 1
    ray_workers: Positive | None = None  # Ray Train workers (default: nodes x max(1, gpus_per_node))
    ray_port_base: Annotated[int, Interval(1024, 64535)] = 6400  # + job id % 1000: an unprivileged port
    ray_head_ip: str | None = None  # default: the first node's address (`hostname --ip-address`)
    sweep_file: str | None = None  # one line of overrides per run: submitted as a job array
    dry_run: bool = False
    test_only: bool = True  # `sbatch --test-only` first, where a controller answers

    @property
    def tasks_per_node(self) -> int:
        return max(1, self.gpus_per_node)

    @property
    def uses_ray(self) -> bool:
        return self.nodes > 1 if self.via_ray is None else self.via_ray


def slurm_templates() -> Path:
    """The templates inside an installed wheel, else the repository's top-level slurm/."""
    here = Path(__file__).resolve().parent.parent
    return here / "slurm" if (here / "slurm").is_dir() else here.parent / "slurm"


class SlurmLauncher:
    def launch(self, cfg: DictConfig) -> dict[str, Any]:
        job = slurm_job(cfg)
        run_dir = Path(cfg.run_dir).resolve()
        # The job would refuse a run dir that holds another config's run: said here, before anything queues.
        refuse_changed_config(run_dir, cfg.resume, cfg.ckpt_path, plain_dict(cfg))
        script = render(cfg, job, run_dir, task_overrides())
        path = run_dir / "slurm" / "job.sbatch"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(script)
        if job.dry_run:
            print(script)
            log.info(f"slurm.dry_run=true, script written to {path} (submit with: sbatch {path})")
            return {}
        job_id = submit(path, test_first=job.test_only)
        output = run_dir / "slurm" / f"job-{job_id}.log"
        log.info(f"submitted job {job_id}; its output: {output}; run dir: {run_dir}")
        return {"job_id": job_id}


def slurm_job(cfg: DictConfig) -> SlurmJob:
    node = cfg.get("slurm") or OmegaConf.create({})
    check_arguments(SlurmJob, node, "slurm")
    job = SlurmJob(**plain_dict(node))
    if cfg.mode == "tune" and job.via_ray is None:
        job.via_ray = True  # a Tune sweep runs on a Ray cluster started in the job, on one node or several
    validate(cfg, job)
    return job


def validate(cfg: DictConfig, job: SlurmJob) -> None:
    """Refuse a config that contradicts the allocation before anything is queued."""
    devices = cfg.trainer.get("devices", 1)
    if cfg.mode == "tune" and job.via_ray is False:
        raise UserError("mode=tune runs Ray Tune on a Ray cluster in the job: drop slurm.via_ray=false")
    if job.nodes > 1 and job.via_ray is False:
        raise UserError(
            f"slurm.nodes={job.nodes} with slurm.via_ray=false: several nodes run through Ray; "
            "drop slurm.via_ray"
        )
    if devices not in (1, "auto", -1, job.tasks_per_node) and not job.uses_ray:
        raise UserError(
            f"trainer.devices={devices} but slurm.gpus_per_node={job.gpus_per_node} gives "
            f"{job.tasks_per_node} task(s) per node: make them equal (or leave trainer.devices unset)"
        )
    if cfg.trainer.get("num_nodes", 1) not in (1, job.nodes):
        raise UserError(
            f"trainer.num_nodes={cfg.trainer.num_nodes} but slurm.nodes={job.nodes}: drop "
            "trainer.num_nodes, the job sets it"
        )
    capacity = job.nodes * job.tasks_per_node
    if job.ray_workers is not None and not 1 <= job.ray_workers <= capacity:
        raise UserError(
            f"slurm.ray_workers={job.ray_workers} but {job.nodes} node(s) x {job.tasks_per_node} "
            f"slot(s) hold {capacity}: lower slurm.ray_workers or ask for more nodes or GPUs"
        )


def task_overrides() -> list[str]:
    """The command line's overrides, less those that say where to run."""
    from hydra.core.hydra_config import HydraConfig

    return [o for o in HydraConfig.get().overrides.task if not WHERE.match(o)]


def render(cfg: DictConfig, job: SlurmJob, run_dir: Path, overrides: list[str]) -> str:
    python = sys.executable
    base = [python, "-m", "trainer", *overrides]
    if job.sweep_file:  # each array task adds its line of overrides and its own run dir
        template, inner = "array.sbatch", ["launcher=local"]
    elif not job.uses_ray:
        template = "single_node.sbatch"
        accelerator = "gpu" if job.gpus_per_node else "cpu"
        inner = [
            f"hydra.run.dir={run_dir}",
            "launcher=local",
            f"++trainer.accelerator={accelerator}",
            f"++trainer.devices={job.tasks_per_node}",
            "++trainer.num_nodes=1",
        ]
        if job.tasks_per_node > 1:
            inner.append("++trainer.strategy=ddp")
    else:
        template = "ray_multi_node.sbatch"
        workers = job.ray_workers or job.nodes * job.tasks_per_node
        inner = [
            f"hydra.run.dir={run_dir}",
            "launcher=ray",
            "launcher.address=auto",
            f"launcher.num_workers={workers}",
            f"launcher.use_gpu={str(job.gpus_per_node > 0).lower()}",
            f"launcher.storage_path={run_dir / 'ray'}",
        ]
    values = {
        "sbatch": "\n".join(f"#SBATCH {line}" for line in sbatch_lines(cfg, job, run_dir, template)),
        "setup": "\n".join(job.setup),
        "workdir": shlex.quote(str(Path.cwd())),
        "command": " ".join(shlex.quote(part) for part in [*base, *inner]),
        "signal_seconds": job.signal_seconds,
        "ray": shlex.quote(str(Path(python).with_name("ray"))),
        "ray_port_base": job.ray_port_base,
        "gpus_per_node": job.gpus_per_node,
        "python": shlex.quote(python),
        "head_ip": job.ray_head_ip or "",
        "run_dir": shlex.quote(str(run_dir)),
        "sweep_file": shlex.quote(str(Path(job.sweep_file).resolve())) if job.sweep_file else "",
    }
    return Template((slurm_templates() / template).read_text()).substitute(values)


def sbatch_lines(cfg: DictConfig, job: SlurmJob, run_dir: Path, template: str) -> list[str]:
    log = run_dir / "slurm" / ("job-%A_%a.log" if job.sweep_file else "job-%j.log")
    lines = [
        f"--job-name={job.job_name or cfg.name}",
        f"--nodes={job.nodes}",
        f"--time={job.time}",
        f"--cpus-per-task={job.cpus_per_task}",
        f"--output={log}",
        "--open-mode=append",  # a requeued job appends to the same log
        "--requeue",
    ]
    if template == "ray_multi_node.sbatch":
        lines += ["--ntasks-per-node=1", f"--signal=B:USR1@{job.signal_seconds}"]
        if job.gpus_per_node:
            lines.append(f"--gpus-per-node={job.gpus_per_node}")
    else:
        lines += [f"--ntasks-per-node={job.tasks_per_node}", f"--signal=USR1@{job.signal_seconds}"]
        if job.gpus_per_node:
            lines.append(f"--gpus-per-node={job.gpus_per_node}")
    if job.sweep_file:
        runs = [line for line in Path(job.sweep_file).read_text().splitlines() if line.strip()]
        lines.append(f"--array=0-{len(runs) - 1}")
    lines += [
        f"--{key}={value}"
        for key, value in (
            ("partition", job.partition),
            ("account", job.account),
            ("qos", job.qos),
            ("mem", job.mem),
        )
        if value
    ]
    lines += [extra.removeprefix("#SBATCH").strip() for extra in job.extra_sbatch]
    return lines


def submit(script: Path, test_first: bool = True) -> str:
    if shutil.which("sbatch") is None:
        raise UserError(
            "sbatch is not on PATH: submit from a SLURM login node, or use slurm.dry_run=true "
            f"and copy {script} there"
        )
    if test_first:
        check = subprocess.run(
            ["sbatch", "--test-only", str(script)], capture_output=True, text=True, timeout=60
        )
        if check.returncode != 0:
            raise UserError(
                f"sbatch --test-only refused {script}: {check.stderr.strip() or check.stdout.strip()}"
            )
    done = subprocess.run(["sbatch", "--parsable", str(script)], capture_output=True, text=True, timeout=60)
    if done.returncode != 0:
        raise UserError(f"sbatch refused {script}: {done.stderr.strip() or done.stdout.strip()}")
    return done.stdout.strip().split(";")[0]
