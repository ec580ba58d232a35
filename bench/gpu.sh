#!/usr/bin/env bash
# The GPU figures BENCHMARKS.md asks for, in two parts that each fit in 10 minutes on one
# H100 (estimated):
#
#   bash bench/gpu.sh train     # optimizer step, search step, training img/s, the all_conv
#                               # residual add, a real search run
#   bash bench/gpu.sh latency   # eval latency, full vs compressed, fp32 / channels_last / amp / compiled
#   bash bench/gpu.sh check     # the GPU tests, then the headline figures at smaller repeats:
#                               # fits a 15-minute lease (about 5 minutes on one H100)
#
# Output goes to the terminal and to $RESULTS/gpu-<part>.txt (default RESULTS:
# bench-results/). The python is $PYTHON, else python3; it needs this repository's
# requirements (ptflops included).
set -uo pipefail
cd "$(dirname "$0")/.."
part=${1:-}
if [ "$part" != train ] && [ "$part" != latency ] && [ "$part" != check ]; then
    echo "usage: bash bench/gpu.sh train|latency|check" >&2
    exit 2
fi
results=${RESULTS:-bench-results}
python=${PYTHON:-python3}
export PYTHONUNBUFFERED=1
mkdir -p "$results"
log="$results/gpu-$part.txt"

step() {  # step TITLE COMMAND...: run one bench, its output in the log; go on if it fails
    echo "== $1" | tee -a "$log"
    shift
    echo "\$ $*" | tee -a "$log"
    timeout "${STEP_TIMEOUT:-600}" "$@" 2>&1 | tee -a "$log"
    echo "(exit status ${PIPESTATUS[0]})" | tee -a "$log"
}

: >"$log"
case "$part" in
train)
    step "device" nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
    step "torch" "$python" -c "import torch; print(torch.__version__, torch.version.cuda, torch.cuda.get_device_name())"
    step "optimizer step" "$python" bench/optimizer_step.py --device cuda --repeats 50
    step "optimizer step, channels_last" "$python" bench/optimizer_step.py --device cuda --repeats 50 --channels-last
    step "search step, fp32" "$python" bench/search_step.py --device cuda --batch-size 256 --image-size 224
    step "search step, amp + channels_last" "$python" bench/search_step.py --device cuda --batch-size 256 \
        --image-size 224 --amp --channels-last
    step "training img/s, amp + channels_last" "$python" bench/train_throughput.py --dummy --device cuda \
        --amp --channels-last --batch-size 256 --image-size 224 --repeats 20
    step "training img/s, fp32" "$python" bench/train_throughput.py --dummy --device cuda \
        --batch-size 256 --image-size 224 --repeats 20
    step "training img/s, amp + channels_last, torch.compile" "$python" bench/train_throughput.py --dummy \
        --device cuda --amp --channels-last --batch-size 256 --image-size 224 --repeats 20 --compile
    step "all_conv retrain step, residual add: index_add vs add_at_channels, channels_last" "$python" \
        bench/residual_add.py --device cuda --channels-last --batch-size 256 --image-size 224 --repeats 20
    # The search script itself, data loading included (its log prints img/s and the data
    # share): two epochs over FakeData's 10,000 images, the second without cuDNN's tuning.
    # --gpu 0: one GPU, as the target says; without it a machine with several would spawn
    # one process per GPU and split the batch.
    runs=$(mktemp -d)
    step "main_search_conv12.py on FakeData, amp + channels_last" "$python" main_search_conv12.py --dummy \
        --device cuda --gpu 0 --amp --channels-last -b 256 -j 12 --epochs 2 --print-freq 20 \
        --no-pretrained --path_to_save "$runs"
    rm -rf "$runs"
    ;;
check)
    export STEP_TIMEOUT=${STEP_TIMEOUT:-150}
    step "device" nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
    step "torch" "$python" -c "import torch; print(torch.__version__, torch.version.cuda, torch.cuda.get_device_name())"
    step "GPU tests" "$python" -m pytest -q -p no:cacheprovider -m gpu tests/test_gpu.py
    step "training img/s, amp + channels_last and fp32" "$python" bench/train_throughput.py --dummy \
        --device cuda --amp --channels-last --batch-size 256 --image-size 224 --repeats 10
    step "training img/s, fp32" "$python" bench/train_throughput.py --dummy --device cuda \
        --batch-size 256 --image-size 224 --repeats 10
    step "optimizer step, channels_last" "$python" bench/optimizer_step.py --device cuda --repeats 20 --channels-last
    runs=$(mktemp -d)
    step "main_search_conv12.py on FakeData, amp + channels_last, one epoch" "$python" main_search_conv12.py \
        --dummy --device cuda --gpu 0 --amp --channels-last -b 256 -j 12 --epochs 1 --print-freq 10 \
        --no-pretrained --path_to_save "$runs"
    rm -rf "$runs"
    step "latency, batch 256" "$python" bench/latency.py --device cuda --batch-sizes 256 --round-to 8 --amp \
        --repeats 10 --warmup 3
    step "fast tests with a GPU visible" "$python" -m pytest -q -p no:cacheprovider -x -m "not slow"
    ;;
latency)
    step "latency, eager forms" "$python" bench/latency.py --device cuda --batch-sizes 1 32 256 \
        --round-to 8 --amp --repeats 20 --warmup 3 --profile
    step "latency, compiled forms" "$python" bench/latency.py --device cuda --batch-sizes 256 \
        --round-to 8 --amp --compile --repeats 20 --warmup 3
    ;;
esac
