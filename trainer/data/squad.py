"""SQuAD-style extractive QA data: reading v1.1/v2.0 files, tokenizing into strided windows, batching.

A question whose context is longer than `max_length` becomes several features (windows that overlap by
`doc_stride` tokens). A training feature's target is the answer's first and last token, or the [CLS] token
when the answer is not inside that window (or the question has none, SQuAD v2). A validation feature keeps
its offset mapping, so predicted token spans map back to characters of the original context.
"""

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from torch.nn.utils.rnn import pad_sequence
from torch.utils.data import DataLoader, Dataset

from trainer.config.ranges import NonNegative, Positive, Seed
from trainer.data.evaluation import evaluation_loader
from trainer.data.loading import ResumableLoader
from trainer.data.qa_facts import write_facts_dataset
from trainer.errors import UserError
from trainer.models.qa import load_tokenizer

MODEL_INPUTS = ("input_ids", "token_type_ids", "attention_mask")


@dataclass
class Example:
    id: str
    question: str
    context: str
    answers: list[str]  # gold texts; empty: unanswerable (SQuAD v2)
    starts: list[int]  # character offsets of the answers in `context`


def read_squad_file(path: str | Path) -> list[Example]:
    """Every question of a SQuAD v1.1 or v2.0 JSON file, each checked (fields present, answers where they
    say they are)."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise UserError(f"SQuAD file {path} does not exist: check data.train_file / data.val_file")
    try:
        document = json.loads(path.read_text(encoding="utf-8"))
        articles = document["data"]
    except json.JSONDecodeError as e:
        raise UserError(f"SQuAD file {path} is not valid JSON ({e}): fix or regenerate the file") from None
    except (KeyError, TypeError):
        raise UserError(
            f'SQuAD file {path} has no top-level "data" list: it is not in SQuAD format'
        ) from None
    records = []
    for a, article in enumerate(articles):
        for p, paragraph in enumerate(_field(article, "paragraphs", path, f"data[{a}]")):
            where = f"data[{a}].paragraphs[{p}]"
            context = _field(paragraph, "context", path, where)
            for q, qa in enumerate(_field(paragraph, "qas", path, where)):
                qa_id = str(qa["id"]) if isinstance(qa, dict) and "id" in qa else f"{where}.qas[{q}]"
                answers = _field(qa, "answers", path, f"example {qa_id}")
                record = {
                    "id": qa_id,
                    "question": _field(qa, "question", path, f"example {qa_id}"),
                    "context": context,
                    "answers": {
                        "text": [_field(x, "text", path, f"example {qa_id}") for x in answers],
                        "answer_start": [
                            _field(x, "answer_start", path, f"example {qa_id}") for x in answers
                        ],
                    },
                }
                if not answers and not qa.get("is_impossible", False):
                    raise UserError(
                        f"SQuAD file {path}: example {qa_id} has no answers and is not marked "
                        '"is_impossible": true: add its answer or mark it unanswerable (SQuAD v2)'
                    )
                records.append(record)
    return [to_example(r, str(path)) for r in records]


def _field(node: Any, key: str, path: Path, where: str) -> Any:
    if not isinstance(node, dict) or key not in node:
        raise UserError(f'SQuAD file {path}: {where} has no "{key}" field: add it (see the SQuAD format)')
    return node[key]


def to_example(record: dict[str, Any], source: str) -> Example:
    """A record in Hugging Face's flat SQuAD layout -> an Example, refusing answers that are not where their
    `answer_start` says."""
    texts, starts = list(record["answers"]["text"]), list(record["answers"]["answer_start"])
    context = record["context"]
    for text, start in zip(texts, starts):
        if not isinstance(text, str) or not isinstance(start, int):
            raise UserError(
                f"{source}: example {record['id']}: an answer needs a text (string) and an answer_start "
                f"(a character offset), got {text!r} at {start!r}: fix the answer"
            )
        if (found := context[start : start + len(text)]) != text:
            raise UserError(
                f"{source}: example {record['id']}: answer {text!r} is not at answer_start={start} "
                f"(the context has {found!r} there): fix answer_start"
            )
    return Example(str(record["id"]), record["question"], context, texts, starts)


@dataclass
class Features:
    """Tokenized windows; `example` maps each window to its question, `offsets` (validation only) to
    character spans of the context, None for question and special tokens."""

    inputs: list[dict[str, list[int]]]
    example: list[int]
    start_positions: list[int]
    end_positions: list[int]
    offsets: list[list[tuple[int, int] | None]]


def tokenize(examples: Sequence[Example], tokenizer: Any, max_length: int, doc_stride: int) -> Features:
    """Question + context windows of at most `max_length` tokens, overlapping by `doc_stride`; each with the
    answer's token span (the [CLS] index, 0, when the window does not hold the whole answer)."""
    if not getattr(tokenizer, "is_fast", False):
        raise UserError(
            f"the tokenizer {type(tokenizer).__name__} gives no offset mapping (it is a slow, Python "
            "tokenizer): use a model that ships a fast tokenizer (tokenizer.json)"
        )
    pad_on_right = tokenizer.padding_side == "right"  # question first, unless the model pads on the left
    questions = [e.question.lstrip() for e in examples]  # leading spaces waste window room
    contexts = [e.context for e in examples]
    encoded = tokenizer(
        questions if pad_on_right else contexts,
        contexts if pad_on_right else questions,
        truncation="only_second" if pad_on_right else "only_first",
        max_length=max_length,
        stride=doc_stride,
        return_overflowing_tokens=True,
        return_offsets_mapping=True,
    )
    context_id = 1 if pad_on_right else 0
    features = Features([], [], [], [], [])
    for i, example_index in enumerate(encoded["overflow_to_sample_mapping"]):
        example = examples[example_index]
        sequence_ids = encoded.sequence_ids(i)
        offsets = [
            span if sequence_ids[t] == context_id else None
            for t, span in enumerate(encoded["offset_mapping"][i])
        ]
        start, end = 0, 0
        if example.answers:
            answer_start = example.starts[0]
            answer_end = answer_start + len(example.answers[0])
            in_context = [(t, span) for t, span in enumerate(offsets) if span is not None]
            if in_context[0][1][0] <= answer_start and in_context[-1][1][1] >= answer_end:
                start = next(t for t, span in in_context if span[1] > answer_start)
                end = next(t for t, span in reversed(in_context) if span[0] < answer_end)
        features.inputs.append({k: encoded[k][i] for k in MODEL_INPUTS if k in encoded})
        features.example.append(example_index)
        features.start_positions.append(start)
        features.end_positions.append(end)
        features.offsets.append(offsets)
    return features


class FeatureSet(Dataset):
    """Training items carry answer positions; validation items carry their feature index instead."""

    def __init__(self, features: Features, train: bool):
        self.features, self.train = features, train

    def __len__(self) -> int:
        return len(self.features.inputs)

    def __getitem__(self, index: int) -> dict[str, Any]:
        item: dict[str, Any] = dict(self.features.inputs[index])
        if self.train:
            item["start_positions"] = self.features.start_positions[index]
            item["end_positions"] = self.features.end_positions[index]
        else:
            item["feature_index"] = index
        return item


class PadBatch:
    """Batches of token lists padded to the longest item's length rounded up to a multiple of `multiple`
    (`multiple=max_length`: to max_length)."""

    def __init__(self, pad_token_id: int, multiple: int):
        self.pad_token_id, self.multiple = pad_token_id, multiple

    def __call__(self, items: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        batch = {}
        for key in items[0]:
            values = [item[key] for item in items]
            if isinstance(values[0], list):
                padding = self.pad_token_id if key == "input_ids" else 0
                padded = pad_sequence(
                    [torch.tensor(v) for v in values], batch_first=True, padding_value=padding
                )
                length = -(-padded.shape[1] // self.multiple) * self.multiple
                batch[key] = F.pad(padded, (0, length - padded.shape[1]), value=padding)
            else:
                batch[key] = torch.tensor(values)
        return batch


@dataclass
class ValidationSet:
    examples: list[Example]
    features: Features
    with_unanswerable: bool  # SQuAD v2: a prediction may be "no answer"


class SquadDataModule(L.LightningDataModule):
    """SQuAD v1.1/v2.0 files, a Hugging Face data set (`name=squad`), or, when neither is given, the embedded
    facts data set (trainer/data/qa_facts.py) written once under `cache_dir`.

    Batches are padded to their longest window rounded up to a multiple of 8 (whole tensor-core tiles); with
    `static_shapes` (on when the model is compiled, which compiles every new shape) to `max_length`: one shape
    in training, and in validation one more for its last, smaller batch. Compiled, set `max_length` near the
    longest window (the embedded set's is under 100 tokens)."""

    def __init__(
        self,
        tokenizer: str,
        train_file: str | None = None,
        val_file: str | None = None,
        name: str | None = None,
        version_2: bool | None = None,
        max_length: Positive = 384,
        doc_stride: NonNegative = 128,  # (< max_length // 2: trainer/config/ranges.py RULES)
        batch_size: Positive = 16,
        eval_batch_size: Positive = 64,
        facts: dict[str, NonNegative] | None = None,  # paragraphs per split, and their seed
        cache_dir: str = "~/.cache/trainer",
        num_workers: NonNegative = 0,
        pin_memory: bool = False,
        static_shapes: bool = False,
        seed: Seed = 0,
    ):
        super().__init__()
        if doc_stride >= max_length // 2:
            raise UserError(
                f"data.doc_stride={doc_stride} must be under half of data.max_length={max_length}: "
                "the windows would not advance through the context"
            )
        if (train_file is None) != (val_file is None):
            raise UserError(
                "give both data.train_file and data.val_file (or neither, for the embedded data set)"
            )
        self.tokenizer_name, self.train_file, self.val_file, self.name = tokenizer, train_file, val_file, name
        self.version_2, self.max_length, self.doc_stride = version_2, max_length, doc_stride
        self.batch_size, self.eval_batch_size = batch_size, eval_batch_size
        self.facts = dict(facts or {"train_paragraphs": 500, "val_paragraphs": 40, "seed": 0})
        self.cache_dir, self.num_workers, self.seed = Path(cache_dir).expanduser(), num_workers, seed
        self.pin_memory, self.pad_multiple = pin_memory, max_length if static_shapes else 8
        self.train_set: FeatureSet | None = None
        self.val_set: ValidationSet | None = None

    def load_examples(self) -> tuple[list[Example], list[Example]]:
        if self.name:
            return load_hub_squad(self.name)
        if self.train_file is None or self.val_file is None:  # (both or neither: __init__)
            paths = write_facts_dataset(self.cache_dir, **self.facts)
            return read_squad_file(paths["train"]), read_squad_file(paths["validation"])
        return read_squad_file(self.train_file), read_squad_file(self.val_file)

    def setup(self, stage: str) -> None:
        if self.train_set is not None:
            return
        tokenizer = load_tokenizer(self.tokenizer_name)
        self.pad_token_id = tokenizer.pad_token_id or 0
        train_examples, val_examples = self.load_examples()
        self.train_set = FeatureSet(
            tokenize(train_examples, tokenizer, self.max_length, self.doc_stride), train=True
        )
        with_unanswerable = (
            self.version_2 if self.version_2 is not None else any(not e.answers for e in val_examples)
        )
        val_features = tokenize(val_examples, tokenizer, self.max_length, self.doc_stride)
        self.val_set = ValidationSet(val_examples, val_features, with_unanswerable)
        if len(self.train_set) < self.batch_size:
            raise UserError(
                f"only {len(self.train_set)} training features, fewer than data.batch_size="
                f"{self.batch_size}: add examples or lower data.batch_size"
            )

    def train_dataloader(self) -> ResumableLoader:
        assert self.train_set is not None  # (setup)
        return ResumableLoader(
            self.train_set,
            batch_size=self.batch_size,
            seed=self.seed,
            drop_last=True,
            collate_fn=PadBatch(self.pad_token_id, self.pad_multiple),
            num_workers=self.num_workers,
            pin_memory=self.pin_memory,
            persistent_workers=self.num_workers > 0,
        )

    def val_dataloader(self) -> DataLoader:
        # Shortest windows first: batches of similar length waste little padding. Order does not matter,
        # every item carries its feature index.
        assert self.val_set is not None  # (setup)
        inputs = self.val_set.features.inputs
        by_length = sorted(range(len(inputs)), key=lambda i: len(inputs[i]["input_ids"]))
        return evaluation_loader(
            FeatureSet(self.val_set.features, train=False),
            self.eval_batch_size,
            by_length,
            collate_fn=PadBatch(self.pad_token_id, self.pad_multiple),
            num_workers=self.num_workers,
            pin_memory=self.pin_memory,
        )


def load_hub_squad(name: str) -> tuple[list[Example], list[Example]]:
    """A Hugging Face data set in SQuAD layout (squad, squad_v2, ...): its train and validation splits."""
    try:
        import datasets
    except ImportError:
        raise UserError(
            "data.name needs the `datasets` package: pip install 'guarded-trainer[hub]'"
        ) from None
    try:
        splits = datasets.load_dataset(name)
    except Exception as e:  # network, auth and name errors all end here
        raise UserError(f"cannot load hub data set {name!r}: {e}") from None
    missing = {"train", "validation"} - set(splits)
    if missing:
        raise UserError(
            f"hub data set {name!r} has no {', '.join(sorted(missing))} split: use one in SQuAD layout"
        )
    # (a split's rows are dicts; `datasets` declares no row type, and its inferred one holds lists too)
    train, validation = (
        [to_example(r, f"hub data set {name}") for r in splits[s]]  # pyright: ignore[reportArgumentType]
        for s in ("train", "validation")
    )
    return train, validation
