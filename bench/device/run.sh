#!/usr/bin/env bash
# The device-side checks and measurements of the product path, for a session lent a GPU. Run from the repo root
# on the GPU machine (torch + triton there; open_clip carried as wheels in .whl/, see ../shared/gpu/kit/prep.sh):
#   bash bench/device/run.sh Q      # ~8 min, when only one call fits: MaPLe's no-graph wall vs GPU time (issue 8),
#                                   #   its train step against eager and tuned (issues 8, 9; B = 4 against eager),
#                                   #   inference at batch 100
#                                   #   (issue 8), the glue fusions and the GEMM question (issue 9), one-GPU torchrun
#                                   #   against the plain run (issue 12)
#   bash bench/device/run.sh A      # ~7 min: GPU tests of the engine, evaluation, cache and eager op path;
#                                   #   no host reads or syncs per step (test_host_reads.py); host vs GPU time; MaPLe train steps (eager, tuned, fastprompt); inference
#   bash bench/device/run.sh B      # ~6 min: runner epochs, the other methods' train steps and inference, a
#                                   #   two-method sweep on GPU 0 (fastprompt sweep, two runs at a time)
#   bash bench/device/run.sh C      # ~9 min: the kernel tests compiled in bf16/fp16, the GPU test tier of the
#                                   #   methods and the runner, a one-process torchrun run against the plain run,
#                                   #   the frozen MLP's fc1 plans: Triton epilogue GEMM vs cuBLAS + activation pass (issue 9 item 2),
#                                   #   MCPL's VAIPL decoder alone (its share of MCPL's step, its kernels: decoder_profile.txt)
#                                   #   and MCPL's whole step by kernel (profile_mcpl_imagenet-b32.txt); the glue fusions
#                                   #   against what they replaced are in Q (glue_ops.py)
#   bash bench/device/run.sh S      # ~7 min: the whole test suite on the GPU (issue 9 item 5: "pytest on a GPU machine
#                                   #   has no failures"), 8 pytest-xdist workers when bench/device/prep.sh carried
#                                   #   its wheel, then bench/ at its tiny workload in one process (results kept apart)
# Writes logs and results under $OUT (the device tool brings them back); commit bench/results/*.json from there.
set -u
PART=${1:-A}
OUT=${OUT:-/tmp/fastprompt-device}
mkdir -p "$OUT"
SITE=$(mktemp -d)
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" .whl/*.whl
rm -rf fastprompt/kernels && cp -r kernels fastprompt/kernels   # kernels/ is installed as fastprompt.kernels
export PYTHONPATH=$SITE:$PWD PYTHONUNBUFFERED=1 FASTPROMPT_BENCH_ROUNDS=${ROUNDS:-15} FASTPROMPT_BENCH_WARMUP=3
T0=$(date +%s)
say() { echo "[$(( $(date +%s) - T0 ))s] $*"; }
stage() {  # stage NAME SECONDS CMD...
  local name=$1 secs=$2; shift 2
  say "stage $name (<= ${secs}s)"
  timeout -k 5 "$secs" "$@" > "$OUT/$name.log" 2>&1
  say "stage $name rc=$?"; tail -n "${TAILN:-12}" "$OUT/$name.log"
}
bench() {  # bench NAME SECONDS FILE WORKLOADS METHODS CONTENDERS
  FASTPROMPT_BENCH_WORKLOADS=$4 FASTPROMPT_BENCH_METHODS=$5 FASTPROMPT_BENCH_CONTENDERS=$6 \
    stage "$1" "$2" python3 -m pytest "bench/$3" -q -p no:cacheprovider --benchmark-disable-gc -rfEs
}
finish() {
  rm -rf fastprompt/kernels
  cp bench/results/*.json "$OUT/" 2>/dev/null
  for j in bench/results/nvidia-*.json; do [ -f "$j" ] && python3 bench/render.py "$j" --out "$OUT/render-$(basename "$j" .json)" >/dev/null 2>&1; done
  say done
}
trap finish EXIT
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
if [ "$PART" = Q ]; then  # one call, each open issue's headline figure (a lent session has ~12 usable minutes)
  TAILN=6 stage host-gpu 75 python3 bench/device/host_gpu.py maple imagenet-b32
  bench train-maple 150 test_bench_train_step.py imagenet-b32 maple eager,tuned,fastprompt
  bench train-maple-b4 60 test_bench_train_step.py imagenet-b4 maple eager,fastprompt  # issue 9's B = 4 target
  bench inference 100 test_bench_inference.py imagenet-b100 maple eager,fastprompt
  TAILN=4 stage glue-ops 40 python3 bench/device/glue_ops.py
  TAILN=4 stage gemm-shapes 45 python3 bench/device/gemm_shapes.py
  TAILN=4 stage torchrun-one 70 python3 bench/device/torchrun_one.py "$OUT/torchrun-one"
fi
if [ "$PART" = S ]; then  # the README's test command's scope, on the GPU: tests/ whole, bench/ at the tiny workload
  WORKERS=$(python3 -c "import xdist" 2>/dev/null && echo "-n 8" || echo "")
  [ -z "$WORKERS" ] && say "pytest-xdist not carried (bench/device/prep.sh): one process, the suite may not finish"
  TAILN=40 stage suite 330 python3 -m pytest -q -p no:cacheprovider $WORKERS -rfE tests
  FASTPROMPT_BENCH_WORKLOADS=tiny-c4-b8 FASTPROMPT_BENCH_COMPILE=off FASTPROMPT_BENCH_RESULTS="$OUT/bench-tiny" \
    TAILN=20 stage bench-suite 90 python3 -m pytest -q -p no:cacheprovider -rfE bench  # one process: one results file
fi
if [ "$PART" = A ]; then
  TAILN=25 stage gpu-tests 150 python3 -m pytest -q -p no:cacheprovider -m gpu -rfE tests/test_training_engine.py \
    tests/test_evaluation.py tests/test_text_cache.py tests/kernels/test_eager_call_path.py tests/runner/test_predict_cli.py
  # No value read back to the host by a warm step or evaluation batch, every method, under CUDA's sync debug mode;
  # device-held batches without host-to-device copies, rendered by the crop_resize kernel (held to torchvision on the GPU)
  TAILN=8 stage host-reads 60 python3 -m pytest -q -p no:cacheprovider -rfE tests/test_host_reads.py tests/kernels/test_crop_resize.py \
    tests/runner/test_device_data.py tests/runner/test_eval_cache.py::test_evaluation_batches_on_a_gpu_do_not_synchronise
  TAILN=6 stage host-gpu 90 python3 bench/device/host_gpu.py maple,coop,mcpl imagenet-b32
  bench train-maple 150 test_bench_train_step.py imagenet-b32 maple eager,tuned,fastprompt
  bench inference 150 test_bench_inference.py imagenet-b100 maple,coop,mmrl,mcpl eager,fastprompt
fi
if [ "$PART" = B ]; then
  bench runner-epoch 200 test_bench_runner_epoch.py imagenet-b32 maple,coop,mmrl,mcpl fastprompt
  bench train-rest 150 test_bench_train_step.py imagenet-b32 coop,cocoop,vpt_deep,mpl,mudpt,mmrl,mcpl eager,fastprompt
  bench inference-rest 100 test_bench_inference.py imagenet-b100 cocoop,vpt_deep,mpl,mudpt eager,fastprompt
  TAILN=6 stage image-tower 75 python3 bench/device/image_tower.py maple 100
  # fastprompt sweep on the GPU: two methods x two seeds, two runs at a time on GPU 0 (CUDA_VISIBLE_DEVICES per job)
  TAILN=8 stage sweep-gpu 60 python3 -m fastprompt sweep --method coop,maple --datasets procedural --seeds 1,2 \
    --shots 2 --devices 0 --jobs-per-device 2 --output "$OUT/sweep-gpu" backbone=tiny pretrained=none epochs=2 \
    num_workers=0 dataset.num_test_per_class=2 dataset.num_val_per_class=1
fi
if [ "$PART" = C ]; then
  TAILN=25 stage kernel-tests 170 python3 -m pytest -q -p no:cacheprovider -x -rfE tests/kernels
  TAILN=25 stage gpu-tier 120 python3 -m pytest -q -p no:cacheprovider -m gpu -rfE tests --ignore=tests/kernels
  TAILN=4 stage torchrun-one 90 python3 bench/device/torchrun_one.py "$OUT/torchrun-one"
  TAILN=4 stage gemm-shapes 45 python3 bench/device/gemm_shapes.py
  TAILN=4 stage mcpl-decoder 45 python3 bench/device/decoder.py
  TAILN=4 stage mcpl-profile 60 python3 bench/device/profile_step.py mcpl imagenet-b32
fi
