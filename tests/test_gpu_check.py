"""scripts/gpu_check.py, the one command that measures the GPU path, run the way CI can: --tiny, on CPU.
Its figures there say nothing about speed: these tests check that every field is measured and sane."""

import collections
import importlib.util
import json
import math
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from helpers import REPO, cli_env

EXPS = ["dcgan", "detector", "ppo", "dqn", "qa"]
# Runs a script (argv[1:]) as on a GPU machine without wandb, ray and torchvision: each of Python's finders is
# wrapped so that it finds neither their modules nor their distributions. Prints which of them got imported.
WITHOUT_THEM = """
import runpy, sys
BLOCKED = ("wandb", "ray", "torchvision")


class Hiding:
    def __init__(self, inner):
        self.inner = inner

    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] in BLOCKED or not hasattr(self.inner, "find_spec"):
            return None
        return self.inner.find_spec(name, path, target)

    def find_distributions(self, *args, **kwargs):
        found = getattr(self.inner, "find_distributions", lambda *a, **k: [])(*args, **kwargs)
        return [d for d in found if (d.metadata["Name"] or "").lower() not in BLOCKED]

    def invalidate_caches(self):
        getattr(self.inner, "invalidate_caches", lambda: None)()


sys.meta_path[:] = [Hiding(finder) for finder in sys.meta_path]
sys.argv = sys.argv[1:]
try:
    runpy.run_path(sys.argv[0], run_name="__main__")
finally:
    imported = sorted(m for m in sys.modules if m.partition(".")[0] in BLOCKED)
    print("imported of wandb, ray, torchvision:", imported)
"""


def load_script():
    spec = importlib.util.spec_from_file_location("gpu_check", REPO / "scripts" / "gpu_check.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def finite_positive(value) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value) and value > 0


def test_the_clock_starts_once_compiled_graphs_stop_appearing(monkeypatch: pytest.MonkeyPatch):
    gpu_check = load_script()
    graphs = iter([0, 2, 3, 3, 3, 3, 4])  # at each warm-up batch's start, then at the timed batches' end
    monkeypatch.setattr(gpu_check, "compiled_graphs", lambda: next(graphs))
    clock = gpu_check.Clock(batches=3, min_warmup=1, max_warmup=20)
    trainer, module = SimpleNamespace(should_stop=False), torch.nn.Linear(1, 1)
    for index in range(8):
        if trainer.should_stop:
            break
        clock.on_train_batch_start(trainer, module, torch.zeros(5, 1), index)
        clock.on_train_batch_end(trainer, module, None, torch.zeros(5, 1), index)
    # Graphs came in batches 0 and 1; batches 2, 3 and 4 made none: the clock starts at batch 5.
    assert clock.warmup_batches == 5 and clock.settled
    assert clock.timed == 3 and trainer.should_stop
    assert clock.new_graphs == 1  # the timed batches compiled once more
    batches_per_s, items_per_s = clock.rates()
    assert items_per_s == pytest.approx(5 * batches_per_s)


def test_an_unsettled_warm_up_ends_at_its_limit(monkeypatch: pytest.MonkeyPatch):
    gpu_check = load_script()
    # a new graph in every batch: counted at each warm-up batch's start, then at the end
    graphs = iter(range(100))
    monkeypatch.setattr(gpu_check, "compiled_graphs", lambda: next(graphs))
    clock = gpu_check.Clock(batches=2, min_warmup=1, max_warmup=4)
    trainer, module = SimpleNamespace(should_stop=False), torch.nn.Linear(1, 1)
    while not trainer.should_stop:
        clock.on_train_batch_start(trainer, module, torch.zeros(2, 1), 0)
        clock.on_train_batch_end(trainer, module, None, torch.zeros(2, 1), 0)
    assert clock.warmup_batches == 4 and not clock.settled and clock.new_graphs == 1


def test_reads_are_summarized_per_step_outside_logging_steps():
    gpu_check = load_script()
    batches = [
        (False, collections.Counter({"trainer/a.py:1": 3})),  # the first batch: apart
        (False, collections.Counter({"trainer/a.py:1": 1})),
        (True, collections.Counter({"trainer/b.py:2": 4})),
        (False, collections.Counter({"trainer/a.py:1": 1, "trainer/c.py:3": 2})),
    ]
    assert gpu_check.summarize_reads(batches) == {
        "first_batch": 3,
        "steps": 2,
        "per_step": 2.0,
        "by_line": {"trainer/a.py:1": 2, "trainer/c.py:3": 2},
        "logging_steps": 1,
        "per_logging_step": 4.0,
    }


def test_qa_flops_and_the_peak_table():
    gpu_check = load_script()
    spec = gpu_check.QASpec(parameters=10, embedding_parameters=99, layers=2, hidden=4)
    # 2 x 3 tokens, each 6 x 10 + 12 x 2 x 4 x 3 FLOPs
    assert spec.flops([(2, 3)]) == 6 * (60 + 288)
    assert gpu_check.peak_tflops("NVIDIA H200") == 989.0
    assert gpu_check.peak_tflops("NVIDIA H100 PCIe") == 756.0
    assert gpu_check.peak_tflops("Some GPU") is None


def test_qa_baselines_give_mfu_on_a_device_of_the_peak_table(monkeypatch: pytest.MonkeyPatch):
    gpu_check = load_script()
    spec = gpu_check.QASpec(parameters=10, embedding_parameters=99, layers=2, hidden=4)
    # The plain loop: 100 tokens/s over one (2, 3) batch in 1 s; trainer's eager run: the same batch in 0.5 s.
    monkeypatch.setattr(gpu_check, "plain_qa", lambda s, mode: (100.0, spec, [(2, 3)], 1.0))
    timed = {("qa", "eager"): {"items_per_s": 150.0, "token_shapes": [(2, 3)], "seconds": 0.5}}
    found = gpu_check.qa_baselines(timed, SimpleNamespace(modes=["eager", "compiled"]), peak=2.0)
    tflops = 6 * (60 + 288) / 1e12
    assert found["by_mode"]["eager"] == pytest.approx(
        {
            "plain_tokens_per_s": 100.0,
            "plain_tflops_per_s": tflops,
            "trainer_over_plain": 1.5,
            "trainer_tflops_per_s": 2 * tflops,
            "plain_mfu": tflops / 2.0,
            "trainer_mfu": tflops,
        }
    )
    assert found["by_mode"]["compiled"].keys() == {"plain_tokens_per_s", "plain_tflops_per_s", "plain_mfu"}
    assert found["parameters"] == 10 and found["peak_bf16_tflops"] == 2.0


@pytest.mark.slow
def test_gpu_check_measures_every_exp_mode_and_check_without_wandb_ray_torchvision(tmp_path: Path):
    out = tmp_path / "gpu_check.json"
    done = subprocess.run(
        [sys.executable, "-c", WITHOUT_THEM, "scripts/gpu_check.py", "--tiny", "--out", str(out)],
        cwd=REPO,
        env=cli_env(tmp_path),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "imported of wandb, ray, torchvision: []" in done.stdout  # none needed, none imported
    report = json.loads(out.read_text())
    assert {"date", "device", "torch", "lightning", "settings", "seconds"} <= report.keys()
    rows = report["exps"]
    assert [(r["exp"], r["mode"]) for r in rows] == [(e, m) for e in EXPS for m in ("eager", "compiled")]
    read_batches = report["settings"]["read_batches"]
    for row in rows:
        assert "error" not in row, row
        for key in ("batches_per_s", "items_per_s", "first_step_s", "wall_s"):
            assert finite_positive(row[key]), (key, row)
        assert row["timed_batches"] == report["settings"]["batches"], row
        assert isinstance(row["graphs_after_warmup"], int) and row["graphs_after_warmup"] == 0, row
        if row["mode"] == "compiled":
            assert row["warmup_batches"] > 3 and row["warmup_settled"] is True, row
            assert isinstance(row["compile_s"], float) and math.isfinite(row["compile_s"]), row
            assert row["resumes_on_cpu"] is True, row  # the last mode's run resumes on CPU
        else:
            reads = row["host_reads"]
            assert reads["steps"] + reads["logging_steps"] == read_batches - 1, row
            assert (reads["per_step"] is None) == (reads["steps"] == 0), row
            assert all(line.startswith("trainer/") and n > 0 for line, n in reads["by_line"].items()), row
    by_exp = {r["exp"]: r["host_reads"] for r in rows if r["mode"] == "eager"}
    assert by_exp["ppo"]["steps"] == 0  # a PPO step is a whole rollout, and every one is logged
    assert by_exp["dqn"]["per_step"] > 0  # a DQN step acts in its environment: reads the actions
    dcgan, qa = report["baselines"]["dcgan"], report["baselines"]["qa"]
    assert finite_positive(dcgan["examples_images_per_s"])
    ratios = dcgan["trainer_over_examples"]
    assert ratios.keys() == {"eager", "compiled"} and all(map(finite_positive, ratios.values()))
    assert finite_positive(qa["parameters"]) and finite_positive(qa["embedding_parameters"])
    assert qa["peak_bf16_tflops"] is None  # a CPU has no entry in the peak table: no MFU
    assert qa["by_mode"].keys() == {"eager", "compiled"}
    for found in qa["by_mode"].values():
        assert found.keys() == {
            "plain_tokens_per_s",
            "plain_tflops_per_s",
            "trainer_over_plain",
            "trainer_tflops_per_s",
        }
        assert all(map(finite_positive, found.values())), found
    assert report["bundle_replays_on_cpu"] is True
    assert finite_positive(report["guard_and_monitor_over_off"])
    for text in ("resumes on CPU", "graphs+", "reads/step", "PyTorch examples' loop", "a plain loop", "MFU"):
        assert text in done.stdout, text
