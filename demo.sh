#!/usr/bin/env bash
# Install, then run the whole GSparsity workflow on the demo digits (scikit-learn's
# handwritten digits, no download): baseline -> search -> register -> retrain.
# 6-7 minutes on 2 idle CPU cores (README). Everything goes under experiments/demo/ (its own
# registry included), so the repository's list_of_models.py is left alone.
set -euo pipefail
cd "$(dirname "$0")"
bash .ci/install
PY=.venv/bin/python
OUT=${OUT:-experiments/demo}  # OUT=... SEED=... bash demo.sh: another folder, another seed
SEED=${SEED:-0}
mkdir -p "$OUT"
[ -f "$OUT/list_of_models.py" ] || cp list_of_models.py "$OUT/list_of_models.py"
DATA=(--data demo --image-size 32 -j 1 --seed "$SEED" --path_to_save "$OUT" -p 1000)
# Baseline and retrain cap each step's gradient norm at 10 (a retrain's median step has about 4):
# one outlier batch (a norm of 966) once threw a retrain from 95% to 29% train top-1. The search
# does not clip: it would change the balance between the loss's gradient and the group-lasso pull.
TRAIN=(-b 64 --lr 0.02 --lr-scheduler cosine --clip-grad-norm 10)
RUN=$(date +%Y%m%d-%H%M%S)

echo "== 1/3 baseline: train a ResNet-50 on the digits"
$PY main_original.py "${DATA[@]}" "${TRAIN[@]}" --epochs 12 --run_id "$RUN"
BASELINE=$(ls -d "$OUT"/original_resnet50_*_"$RUN")/model_best.pth.tar

# The paper's recipe (adaptive lr 1e-3, mu 0.05, threshold 1e-6) needs tens of thousands of
# steps: a filter whose prox is zero only decays by (1 - lr) per step. The demo has ~115, so it
# takes larger non-adaptive steps, prunes BN and filter together (--group channel) and lands
# on half the MACs with the budget mask, which ranks each filter against its own layer.
# Its last two epochs train without the filters that mask cuts (--settle-epochs 2, cosine lr), so
# the search ends with an exact compressed model that kept its accuracy, and the retrain
# starts from the search's weights: bench/quality.py measured that best (BENCHMARKS.md, "Quality").
echo "== 2/3 search: ProxSGD shrinks conv1/conv2 filters; compress to 50% of the MACs; register as demo_${RUN//-/_}"
$PY main_search_conv12.py "${DATA[@]}" --pretrained="$BASELINE" -b 64 --epochs 5 \
    --lr 0.05 --no-adaptive_lr --normalization none --weight_decay 0.1 --group channel \
    --pruning_threshold 1e-3 --target-macs 50% --budget-ranking layer --budget-steps 2 --budget-probes 1 \
    --bn-calibration-images 128 --lr-scheduler cosine --settle-epochs 2 \
    --register "demo_${RUN//-/_}" --registry "$OUT/list_of_models.py" --run_id "$RUN"

echo "== 3/3 retrain the compressed model"
$PY main_reduce_retrain_conv12.py "${DATA[@]}" "${TRAIN[@]}" --epochs 20 \
    --baseline_model "demo_${RUN//-/_}" --registry "$OUT/list_of_models.py"
