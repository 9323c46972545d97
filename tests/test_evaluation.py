"""Validation under several ranks scores every item exactly once: three real gloo processes share out
validation sets whose sizes three does not divide, and gather their results."""

import json
import socket
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from helpers import compose_config
from hydra.utils import instantiate
from omegaconf import OmegaConf

from trainer.data.evaluation import gather_by_key, rank_share

WORLD = 3


def validation_keys(name: str, batch: Any) -> list[int]:
    """The items a validation batch holds, by the key each task files its results under."""
    if name == "images":
        return batch[0].tolist()  # (index, image) batches
    if name == "coco":
        return [int(target["image_id"]) for target in batch[1]]
    return batch["feature_index"].tolist()  # QA windows


def share_and_gather(rank: int, port: int, data: dict[str, dict], out: Path) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD)
    results = {}
    for name, node in data.items():
        datamodule = instantiate(node, _convert_="all")
        if rank == 0:  # as Lightning does: one rank writes the embedded data sets
            datamodule.prepare_data()
        dist.barrier()
        datamodule.setup("fit")
        share = [key for batch in datamodule.val_dataloader() for key in validation_keys(name, batch)]
        results[name] = {"share": share, "gathered": gather_by_key({key: rank for key in share})}
    seeds = rank_share(range(100, 110))  # RL evaluation seeds
    results["seeds"] = {"share": seeds, "gathered": gather_by_key(dict.fromkeys(seeds, rank))}
    torch.save(results, out / f"rank{rank}.pt")
    dist.destroy_process_group()


def squad_file(questions: int) -> dict:
    context = "The answer to question number seven is a number."
    qas = [
        {
            "id": f"q{i}",
            "question": f"What is answer {i}?",
            "answers": [{"text": "a number", "answer_start": context.index("a number")}],
        }
        for i in range(questions)
    ]
    return {"version": "1.1", "data": [{"title": "t", "paragraphs": [{"context": context, "qas": qas}]}]}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_three_ranks_score_every_validation_item_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    squad = tmp_path / "squad.json"
    squad.write_text(json.dumps(squad_file(7)))
    data = {
        "images": compose_config("+exp=dcgan", "data.val_fraction=0.0056", "data.batch_size=4").data,  # 10
        "coco": compose_config(
            "+exp=detector",
            "data.canvases.train_images=20",
            "data.canvases.val_images=10",
            "data.batch_size=4",
        ).data,
        # 7 questions, one window each
        "qa": compose_config(
            "+exp=qa",
            f"data.train_file={squad}",
            f"data.val_file={squad}",
            "data.batch_size=2",
            "data.eval_batch_size=4",
        ).data,
    }
    data = {name: OmegaConf.to_container(node, resolve=True) for name, node in data.items()}
    mp.start_processes(
        share_and_gather, args=(free_port(), data, tmp_path), nprocs=WORLD, start_method="spawn"
    )

    ranks = [torch.load(tmp_path / f"rank{rank}.pt", weights_only=False) for rank in range(WORLD)]
    for name in ranks[0]:
        shares = [r[name]["share"] for r in ranks]
        items = set().union(*shares)
        assert len(items) % WORLD, f"{name}: pick a size that {WORLD} ranks cannot share evenly"
        assert len({len(share) for share in shares}) == 1, f"{name}: ranks run different numbers of items"
        for r in ranks:
            assert sorted(r[name]["gathered"]) == sorted(items), name  # on every rank, each item once
        first_rank = {key: min(rank for rank, share in enumerate(shares) if key in share) for key in items}
        assert ranks[0][name]["gathered"] == first_rank  # a repeated item's result is its first rank's
    assert len(set().union(*(r["images"]["share"] for r in ranks))) == 10
    assert len(set().union(*(r["coco"]["share"] for r in ranks))) == 10
    assert len(set().union(*(r["seeds"]["share"] for r in ranks))) == 10
    assert len(set().union(*(r["qa"]["share"] for r in ranks))) == 7
