#!/usr/bin/env bash
# One-time set-up on a fresh clone with ../shared beside it: install, then fill the asset home
# ($QPEFT_HOME, default ~/.cache/qpeft) with the default model and a link to the shared data.
set -euo pipefail
cd "$(dirname "$0")"
python -m pip install -q torch==2.13.0 -r requirements.txt
home="${QPEFT_HOME:-$HOME/.cache/qpeft}"
python ../shared/tools/make_model.py "$home/models/SmolLM2-135M-Instruct"
mkdir -p "$home/data"
for name in msmarco_small msmarco_train_extra nq_small; do
  ln -sfn "$(cd "../shared/data/$name" && pwd)" "$home/data/$name"   # read in place, never copied
done
echo "setup: assets in $home"
