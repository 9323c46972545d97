"""SQuAD evaluation: answer texts from start/end logits (n-best search), then exact match and F1.

The metric follows the official SQuAD v2.0 script: answers are normalized (lower case, no punctuation,
no articles a/an/the, single spaces), each prediction is scored against its best-matching gold answer,
and an unanswerable question counts as correct only when the prediction is empty. torchmetrics' SQuAD
metric covers v1.1 only and gives no per-question scores, which the W&B table shows.
"""

import collections
import re
import string
from collections.abc import Sequence

import numpy as np

from trainer.data.squad import Example, Features

_ARTICLES = re.compile(r"\b(a|an|the)\b", re.UNICODE)
_PUNCTUATION = set(string.punctuation)


def normalize_answer(text: str) -> str:
    text = "".join(ch for ch in text.lower() if ch not in _PUNCTUATION)
    return " ".join(_ARTICLES.sub(" ", text).split())


def exact_match(prediction: str, gold: str) -> float:
    return float(normalize_answer(prediction) == normalize_answer(gold))


def token_f1(prediction: str, gold: str) -> float:
    predicted, expected = normalize_answer(prediction).split(), normalize_answer(gold).split()
    if not predicted or not expected:  # "no answer" on either side: right only if both are empty
        return float(predicted == expected)
    common = sum((collections.Counter(predicted) & collections.Counter(expected)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(predicted), common / len(expected)
    return 2 * precision * recall / (precision + recall)


def score(prediction: str, golds: Sequence[str]) -> tuple[float, float]:
    """(exact match, F1) of one prediction against its best gold answer; no gold answers = unanswerable."""
    golds = [g for g in golds if normalize_answer(g)] or [""]
    return max(exact_match(prediction, g) for g in golds), max(token_f1(prediction, g) for g in golds)


def squad_metrics(predictions: dict[str, str], examples: Sequence[Example]) -> dict[str, float]:
    """EM and F1 in percent over the examples that have a prediction; with unanswerable questions among them,
    also the scores on the answerable and the unanswerable part (SQuAD v2's HasAns / NoAns)."""
    scored = [(e, *score(predictions[e.id], e.answers)) for e in examples if e.id in predictions]
    if not scored:
        return {}
    metrics = {
        "exact": 100 * float(np.mean([em for _, em, _ in scored])),
        "f1": 100 * float(np.mean([f1 for _, _, f1 in scored])),
    }
    unanswerable = [f1 for e, _, f1 in scored if not e.answers]
    if unanswerable:
        answerable = [f1 for e, _, f1 in scored if e.answers]
        metrics["f1_has_answer"] = 100 * float(np.mean(answerable)) if answerable else float("nan")
        metrics["f1_no_answer"] = 100 * float(np.mean(unanswerable))
    return metrics


def predict_answers(
    examples: Sequence[Example],
    features: Features,
    logits: dict[int, tuple[np.ndarray, np.ndarray]],
    n_best: int = 20,
    max_answer_length: int = 30,
    with_unanswerable: bool = False,
    null_threshold: float = 0.0,
) -> dict[str, str]:
    """The answer text of every example that has at least one feature in `logits` (feature index -> start
    and end logits over its tokens).

    Candidates are the `n_best` start and end tokens of each window that lie in the context, with
    start <= end < start + max_answer_length and a non-empty text; the best scores start + end logit. With
    unanswerable questions (SQuAD v2) the answer is empty when the [CLS] score of the best window beats it
    by more than `null_threshold`.
    """
    by_example: dict[int, list[int]] = collections.defaultdict(list)
    for feature_index in logits:
        by_example[features.example[feature_index]].append(feature_index)
    answers = {}
    for example_index, feature_indices in by_example.items():
        example = examples[example_index]
        best_text, best_score, null_score = "", -np.inf, np.inf
        for f in feature_indices:
            start_logits, end_logits = logits[f]
            offsets = features.offsets[f]
            null_score = min(null_score, start_logits[0] + end_logits[0])
            starts = np.argsort(start_logits)[::-1][:n_best]
            ends = np.argsort(end_logits)[::-1][:n_best]
            for s in starts:
                if s >= len(offsets) or offsets[s] is None:
                    continue
                for e in ends:
                    if e >= len(offsets) or offsets[e] is None or not s <= e < s + max_answer_length:
                        continue
                    if offsets[s][0] >= offsets[e][1]:
                        continue  # an empty span (zero-width tokens) is no answer; "" is the null answer's
                    candidate = start_logits[s] + end_logits[e]
                    if candidate > best_score:
                        best_score = candidate
                        best_text = example.context[offsets[s][0] : offsets[e][1]]
        if with_unanswerable and null_score - best_score > null_threshold:
            best_text = ""
        answers[example.id] = best_text
    return answers
