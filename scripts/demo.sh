#!/usr/bin/env bash
# The README's first command: from a fresh clone, install what the demo needs and run it.
#
#   bash scripts/demo.sh                 install, then: hs-star fit -c configs/tiny/hs_star.yaml
#   bash scripts/demo.sh --no-install    run the demo in the environment as it is
#   bash scripts/demo.sh [--no-install] --trainer.default_root_dir=/tmp/demo ...   extra hs-star arguments
#
# It installs torch's CPU wheel first (torch==2.13.0: anything that pulls torch before it
# resolves a CUDA build of several GB), then the package with its plots extra, pinned by
# .ci/constraints-cpu.txt; no DeepSpeed, vLLM or test tools (bash .ci/run installs everything).
# The demo: from the shipped M_0 (data/tiny/m0), 3 HS-STaR iterations on CPU with a held-out
# evaluation before and after each; results in checkpoints/tiny/hs_star/results.md (and .png).
set -euo pipefail
cd "$(dirname "$0")/.."
export PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_ROOT_USER_ACTION=ignore

install=1
args=()
for arg in "$@"; do
    if [ "$arg" = "--no-install" ]; then install=0; else args+=("$arg"); fi
done

if [ "$install" = 1 ]; then
    echo "== torch (CPU wheel) first"
    python -m pip install -q torch==2.13.0
    echo "== the package and its plots extra, with the versions measured together"
    python -m pip install -q -c .ci/constraints-cpu.txt -e ".[plots]"
fi

echo "== the demo: hs-star fit -c configs/tiny/hs_star.yaml ${args[*]:-}"
python -m hs_star_pl fit -c configs/tiny/hs_star.yaml ${args[@]+"${args[@]}"}
