#!/usr/bin/env bash
# Creates the project's own environment in .venv (once) and installs trainer into it.
# Idempotent: a finished environment is detected by its stamp file and left alone.
#
#   scripts/bootstrap.sh              torch from the package index as pip resolves it (on PyPI's Linux
#                                     wheels that is torch's default CUDA build; on CI a CPU build)
#   scripts/bootstrap.sh --cpu        the CPU-only build, from download.pytorch.org/whl/cpu
#   scripts/bootstrap.sh --cuda 12.6  the build for CUDA 12.6 (any version torch publishes builds for),
#                                     from download.pytorch.org/whl/cu126: pick one your driver runs
#   --print                           say what would be installed, install nothing
# TRAINER_TORCH=cpu or TRAINER_TORCH=cuda12.6 in the environment does the same as the flags.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="${TRAINER_VENV:-$root/.venv}"
stamp="$venv/.trainer-installed"
torch_pin="torch==2.13.0"  # the version the tests run on; pyproject.toml allows 2.13.x

build="${TRAINER_TORCH:-}"
print_only=false
while [[ $# -gt 0 ]]; do
  case "$1" in
    --cpu) build=cpu ;;
    --cuda)
      if [[ -z "${2:-}" || "$2" == -* ]]; then
        echo "error: --cuda needs the CUDA version of the build, e.g. --cuda 12.6" >&2; exit 2
      fi
      build="cuda$2"; shift ;;
    --print) print_only=true ;;
    *) echo "error: unknown option $1: use --cpu, --cuda X.Y or --print" >&2; exit 2 ;;
  esac
  shift
done
case "$build" in
  "") torch_index=() ;;
  cpu) torch_index=(--index-url https://download.pytorch.org/whl/cpu) ;;
  cuda[0-9]*.[0-9]*)
    version="${build#cuda}"
    if [[ ! "$version" =~ ^[0-9]+\.[0-9]+$ ]]; then
      echo "error: --cuda $version is not a CUDA version: use --cuda MAJOR.MINOR, e.g. --cuda 12.6" >&2; exit 2
    fi
    torch_index=(--index-url "https://download.pytorch.org/whl/cu${version//./}") ;;
  *) echo "error: torch build '${build#cuda}' is not cpu or a CUDA version: use --cpu or --cuda MAJOR.MINOR," \
          "e.g. --cuda 12.6" >&2; exit 2 ;;
esac
if $print_only; then
  echo "pip install $torch_pin ${torch_index[*]}"
  exit 0
fi
# Reinstall when the dependency list or the torch build changes.
want="$( (sha256sum "$root/pyproject.toml" "$root/scripts/bootstrap.sh"; echo "$build") | sha256sum | cut -c1-16)"

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
pip_install "$torch_pin" "${torch_index[@]}"
pip_install -e "$root[dev]"
# torchvision is optional (its ops and detectors are used where it imports). A torchvision built for another
# torch than this one fails on import and takes Lightning and Ray down with it: refuse that one only.
if "$venv/bin/python" -m pip show --quiet torchvision 2>/dev/null && ! "$venv/bin/python" -c "import torchvision" 2>/dev/null; then
  echo "error: torchvision is installed but does not import next to this torch (built for another one):" \
       "pip uninstall torchvision, or install the torchvision built for $torch_pin" >&2
  exit 1
fi
echo "$want" > "$stamp"
