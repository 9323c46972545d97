"""Extractive QA: window preprocessing, answer post-processing, the SQuAD metric, bad input, the CLI run."""

import json
from pathlib import Path

import numpy as np
import pytest
from helpers import run_cli
from wandb_offline import find_runs, read_run

from trainer.data.qa_facts import squad_split, write_facts_dataset
from trainer.data.squad import Example, Features, SquadDataModule, load_hub_squad, read_squad_file, tokenize
from trainer.errors import UserError
from trainer.metrics.squad import normalize_answer, predict_answers, score, squad_metrics
from trainer.models.qa import load_tokenizer


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer("minilm")


def long_example(shift: int = 0) -> Example:
    """A context of ~300 tokens with one answer in the middle, moved right by `shift` words."""
    filler = " ".join(
        f"Sentence {i} says nothing about the lighthouse keeper of the island." for i in range(12)
    )
    context = f"{filler} {'so ' * shift}The lighthouse was built by Ada Cenmorzar Velbri in 1871. {filler}"
    answer = "Ada Cenmorzar Velbri"
    return Example(f"long-{shift}", "Who built the lighthouse?", context, [answer], [context.index(answer)])


def answer_tokens(features, tokenizer, f: int) -> str:
    ids = features.inputs[f]["input_ids"][features.start_positions[f] : features.end_positions[f] + 1]
    return tokenizer.decode(ids)


# -- preprocessing ---------------------------------------------------------------------------------------


def test_windows_point_at_the_answer_or_at_cls(tokenizer):
    # The answer slides through window boundaries: some windows hold it whole (in the overlap of two windows,
    # both do), some cut it, most miss it. Only a window holding all of it may point at it.
    examples = [long_example(shift) for shift in range(30)]
    features = tokenize(examples, tokenizer, max_length=64, doc_stride=24)
    holding, cut, without = [], [], []
    for f, offsets in enumerate(features.offsets):
        example = examples[features.example[f]]
        spans = [s for s in offsets if s is not None]
        window_start, window_end = spans[0][0], spans[-1][1]
        answer_start, answer_end = example.starts[0], example.starts[0] + len(example.answers[0])
        if window_start <= answer_start and answer_end <= window_end:
            holding.append(f)
        elif window_start < answer_end and answer_start < window_end:
            cut.append(f)
        else:
            without.append(f)
    assert all(features.example.count(e) > 4 for e in range(len(examples)))  # strided into many windows
    assert cut and without
    assert len(holding) > len(examples), "in the overlaps two windows hold the whole answer"
    for f in holding:
        assert answer_tokens(features, tokenizer, f) == normalize_answer(examples[0].answers[0])
        assert features.offsets[f][0] is None  # [CLS] is never part of an answer
    for f in cut + without:
        assert features.start_positions[f] == features.end_positions[f] == 0


def test_every_embedded_answer_maps_to_its_tokens(tokenizer, tmp_path):
    examples = read_squad_file(write_facts_dataset(tmp_path, 20, 2, seed=7)["train"])
    features = tokenize(examples, tokenizer, max_length=256, doc_stride=64)  # one window per question
    checked = 0
    for f, e in enumerate(features.example):
        if examples[e].answers and features.start_positions[f]:
            assert answer_tokens(features, tokenizer, f) == examples[e].answers[0].lower()
            checked += 1
    assert checked == sum(bool(e.answers) for e in examples)


def test_unanswerable_questions_are_in_the_embedded_set():
    questions = [q for article in squad_split(30, seed=3)["data"] for q in article["paragraphs"][0]["qas"]]
    unanswerable = [q for q in questions if q["is_impossible"]]
    assert 0.05 < len(unanswerable) / len(questions) < 0.4
    assert all(not q["answers"] for q in unanswerable)


# -- post-processing: logits -> answer text ---------------------------------------------------------------


def one_hot_logits(
    features, f: int, start: int, end: int, null: float = -5.0
) -> tuple[np.ndarray, np.ndarray]:
    width = len(features.inputs[f]["input_ids"])
    s, e = np.full(width, -10.0), np.full(width, -10.0)
    s[start], e[end] = 5.0, 5.0
    s[0] = e[0] = null
    return s, e


def test_predicted_spans_map_back_to_context_text(tokenizer):
    example = long_example()
    features = tokenize([example], tokenizer, max_length=64, doc_stride=24)
    f = next(i for i, s in enumerate(features.start_positions) if s)
    logits = {f: one_hot_logits(features, f, features.start_positions[f], features.end_positions[f])}
    assert predict_answers([example], features, logits) == {"long-0": "Ada Cenmorzar Velbri"}
    # A higher-scoring start 3 tokens earlier makes a span 3 tokens longer: chosen only if that length is
    # allowed.
    s, _e = logits[f]
    s[features.start_positions[f] - 3] = 6.0
    length = features.end_positions[f] - features.start_positions[f] + 1
    assert predict_answers([example], features, logits, max_answer_length=length + 2) == {
        "long-0": "Ada Cenmorzar Velbri"
    }
    assert predict_answers([example], features, logits, max_answer_length=length + 3)["long-0"].endswith(
        "by Ada Cenmorzar Velbri"
    )


def test_a_zero_width_span_is_never_the_answer():
    """A token whose character span is empty (a tokenizer's zero-width piece) must not make the answer empty:
    the best non-empty span wins, as in the reference post-processing."""
    example = Example(id="zw", question="who?", context="Ada wrote it", answers=["Ada"], starts=[0])
    features = Features(
        inputs=[{"input_ids": [0] * 5}],
        example=[0],
        start_positions=[0],
        end_positions=[0],
        offsets=[[None, (3, 3), (0, 3), (4, 9), None]],
    )
    start, end = np.full(5, -10.0), np.full(5, -10.0)
    start[1] = end[1] = 8.0  # the zero-width token scores best
    start[2] = end[2] = 5.0
    assert predict_answers([example], features, {0: (start, end)}) == {"zw": "Ada"}


def test_null_threshold_decides_no_answer(tokenizer):
    example = long_example()
    features = tokenize([example], tokenizer, max_length=64, doc_stride=24)
    f = next(i for i, s in enumerate(features.start_positions) if s)
    logits = {
        f: one_hot_logits(features, f, features.start_positions[f], features.end_positions[f], null=6.0)
    }
    # null score 12 vs best span 10: v2 answers "", v1 must answer, a threshold above the gap keeps the span.
    assert predict_answers([example], features, logits, with_unanswerable=True) == {"long-0": ""}
    assert (
        predict_answers([example], features, logits, with_unanswerable=False)["long-0"]
        == "Ada Cenmorzar Velbri"
    )
    assert (
        predict_answers([example], features, logits, with_unanswerable=True, null_threshold=2.5)["long-0"]
        != ""
    )


# -- the metric ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("prediction", "golds", "exact", "f1"),
    [
        ("The Cat!", ["cat"], 1.0, 1.0),  # case, punctuation, articles
        ("an  old   oak", ["old oak"], 1.0, 1.0),  # whitespace
        ("the big red dog", ["red dog barked"], 0.0, 2 / 3),  # 2 of 3 tokens on each side
        ("Paris", ["London", "paris, France", "Paris"], 1.0, 1.0),  # best of several gold answers
        ("in Paris", ["London", "Paris France"], 0.0, 0.5),  # P 1/2, R 1/2 against the second
        ("", [], 1.0, 1.0),  # unanswerable, answered ""
        ("London", [], 0.0, 0.0),  # unanswerable, answered
        ("", ["London"], 0.0, 0.0),  # answerable, answered ""
        ("the", ["a"], 1.0, 1.0),  # both normalize to "": as the official script
    ],
)
def test_squad_scores_hand_cases(prediction, golds, exact, f1):
    assert score(prediction, golds) == (exact, pytest.approx(f1))


def test_squad_metrics_averages_and_splits_by_answerability():
    examples = [
        Example("a", "q", "c", ["red dog barked"], [0]),
        Example("b", "q", "c", ["x"], [0]),
        Example("c", "q", "c", [], []),
        Example("d", "q", "c", ["never predicted"], [0]),
    ]
    metrics = squad_metrics({"a": "the big red dog", "b": "x", "c": "y"}, examples)
    assert metrics["exact"] == pytest.approx(100 / 3)
    assert metrics["f1"] == pytest.approx(100 * (2 / 3 + 1 + 0) / 3)
    assert metrics["f1_has_answer"] == pytest.approx(100 * (2 / 3 + 1) / 2)
    assert metrics["f1_no_answer"] == 0.0


# -- bad input -------------------------------------------------------------------------------------------


def squad_file(tmp_path: Path, qa: dict, context: str = "Ada was born in Lyon.") -> Path:
    path = tmp_path / "bad.json"
    path.write_text(
        json.dumps(
            {"version": "v2.0", "data": [{"title": "t", "paragraphs": [{"context": context, "qas": [qa]}]}]}
        )
    )
    return path


@pytest.mark.parametrize(
    ("qa", "message"),
    [
        (
            {"id": "q7", "question": "Where?", "answers": [{"text": "Lyon", "answer_start": 3}]},
            r"example q7: answer 'Lyon' is not at answer_start=3 \(the context has ' was' there\): "
            r"fix answer_start",
        ),
        (
            {"id": "q8", "answers": [{"text": "Lyon", "answer_start": 16}]},
            r'example q8 has no "question" field',
        ),
        (
            {"id": "q9", "question": "Where?", "answers": [{"text": "Lyon"}]},
            r'example q9 has no "answer_start"',
        ),
        ({"id": "q10", "question": "Where?", "answers": []}, r"example q10 has no answers and is not marked"),
        (
            {"id": "q11", "question": "Where?", "answers": [{"text": "Lyon", "answer_start": "16"}]},
            r"example q11: an answer needs a text \(string\) and an answer_start \(a character offset\), "
            r"got 'Lyon' at '16'",
        ),
    ],
)
def test_malformed_squad_files_name_the_example(tmp_path, qa, message):
    path = squad_file(tmp_path, qa)
    with pytest.raises(UserError, match=message) as error:
        read_squad_file(path)
    assert str(path) in str(error.value)


def test_unreadable_squad_files(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        read_squad_file(tmp_path / "missing.json")
    (tmp_path / "broken.json").write_text('{"data": [')
    with pytest.raises(UserError, match=r"broken\.json is not valid JSON"):
        read_squad_file(tmp_path / "broken.json")
    (tmp_path / "other.json").write_text('{"rows": []}')
    with pytest.raises(UserError, match='no top-level "data" list'):
        read_squad_file(tmp_path / "other.json")


def test_a_tokenizer_without_offsets_is_refused():
    from transformers import ByT5Tokenizer  # a Python tokenizer: no offset mapping

    with pytest.raises(UserError, match="ByT5Tokenizer gives no offset mapping"):
        tokenize([long_example()], ByT5Tokenizer(), max_length=64, doc_stride=16)


def test_bad_data_settings_are_refused():
    with pytest.raises(UserError, match=r"doc_stride=128 must be under half of data\.max_length=128"):
        SquadDataModule(tokenizer="minilm", max_length=128, doc_stride=128)
    with pytest.raises(UserError, match=r"give both data\.train_file and data\.val_file"):
        SquadDataModule(tokenizer="minilm", train_file="train.json")
    with pytest.raises(UserError, match="cannot load the tokenizer of '/nowhere/model'"):
        load_tokenizer("/nowhere/model")


# -- end to end ------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_short_qa_run_writes_exact_and_f1(tmp_path, home):
    run_dir = tmp_path / "run"
    done = run_cli(
        "+exp=qa",
        "++trainer.max_steps=3",
        "++trainer.limit_val_batches=2",
        "data.facts.train_paragraphs=40",
        "++trainer.enable_progress_bar=false",
        f"hydra.run.dir={run_dir}",
        home=home,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    metrics = json.loads((run_dir / "metrics.json").read_text())
    final = {key.removeprefix("val/"): metrics[key]["final"] for key in metrics if key.startswith("val/")}
    assert all(metrics[f"val/{key}"]["mode"] == "max" for key in final)
    assert final["exact"] <= final["f1"]  # an exact match is an F1 of 100
    # F1 averages the answerable and the unanswerable questions: it lies between their two F1s.
    assert min(final["f1_has_answer"], final["f1_no_answer"]) <= final["f1"]
    assert final["f1"] <= max(final["f1_has_answer"], final["f1_no_answer"])
    # two distinct parts, so the bracket is not a point
    assert final["f1_has_answer"] != final["f1_no_answer"]
    assert metrics["val/f1"]["best_step"] == 3  # validated where max_steps stopped it, mid-epoch
    (run_path,) = find_runs(run_dir / "wandb")
    run = read_run(run_path)
    table = run.summary["val/answers"]
    assert table["_type"] == "table-file" and table["nrows"] == 20


def test_a_data_set_in_hugging_face_layout_loads(tmp_path):
    # The hub path (data.name=squad) on a local folder in the same layout: datasets reads the train and
    # validation files.
    context = "Ada was born in Lyon in 1871."
    for split, question in (("train", "Where was Ada born?"), ("validation", "When was Ada born?")):
        answer = "Lyon" if split == "train" else "1871"
        row = {
            "id": split,
            "title": "Ada",
            "context": context,
            "question": question,
            "answers": {"text": [answer], "answer_start": [context.index(answer)]},
        }
        (tmp_path / f"{split}.jsonl").write_text(json.dumps(row) + "\n")
    train, validation = load_hub_squad(str(tmp_path))
    assert train == [Example("train", "Where was Ada born?", context, ["Lyon"], [16])]
    assert validation[0].answers == ["1871"] and validation[0].starts == [24]


@pytest.mark.parametrize("with_unanswerable", [False, True])
def test_v1_and_v2_files_set_whether_no_answer_is_allowed(tmp_path, with_unanswerable):
    paths = []
    for split, seed in (("train", 1), ("validation", 2)):
        paths.append(tmp_path / f"{split}.json")
        paths[-1].write_text(json.dumps(squad_split(6, seed, with_unanswerable=with_unanswerable)))
    data = SquadDataModule(
        tokenizer="minilm",
        train_file=str(paths[0]),
        val_file=str(paths[1]),
        batch_size=4,
        max_length=128,
        doc_stride=32,
    )
    data.setup("fit")
    assert data.val_set.with_unanswerable is with_unanswerable
    batch = next(iter(data.train_dataloader()))
    longest = int(batch["attention_mask"].sum(1).max())
    assert batch["input_ids"].shape[1] == -(-longest // 8) * 8  # to the longest, in whole multiples of 8
    assert (batch["start_positions"] <= batch["end_positions"]).all()
