#!/usr/bin/env bash
# One lent-GPU session in one command (bench/RESULTS.md records what it printed):
#   1. build the extension for this machine's torch and GPU (CUDA sampler included)
#   2. python bench/gpu_suite.py (correctness + timings against the fair torch baselines)
#   3. the CUDA tests (kernels, sampler bad input, the monitor's no-sync test) and tests/test_distributed.py
#   4. torchrun with NCCL (world size 1): LightGCN and GraphSAGE (CUDA sampler) on ml-100k
#   5. time to quality on the GPU: GF-CF on Gowalla (fit + full evaluation); the trained MF recipe
#      of bench/time_to_quality.py for one minute, its test curve traced off the clock
# Usage (repo root; data under $GLREC_DATA_DIR; $OUT collects the logs):
#   GLREC_DATA_DIR=... OUT=/tmp/gpu bash bench/gpu_session.sh
# Each step has its own time limit and the script goes on when one fails.
set -u
OUT=${OUT:-/tmp/glrec_gpu}
export OUT
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0} MAX_JOBS=${MAX_JOBS:-16}
PY=${PY:-python3}
step() { echo "== $1 ($(date +%T))"; }

step "machine" | tee "$OUT/session.log"
{ nvidia-smi -L; $PY -c 'import torch, triton; print("torch", torch.__version__, "cuda", torch.version.cuda, "triton", triton.__version__, torch.cuda.get_device_name())'; git rev-parse HEAD 2>/dev/null; git status --short | head; } 2>&1 | tee -a "$OUT/session.log"

step "build" | tee -a "$OUT/session.log"
timeout 180 $PY -m pip install -q --no-build-isolation --no-deps --no-index -e . > "$OUT/build.log" 2>&1 \
  || timeout 180 $PY setup.py build_ext --inplace >> "$OUT/build.log" 2>&1
tail -3 "$OUT/build.log" | tee -a "$OUT/session.log"
$PY -c 'from glrec_fast import ops; import json; print(json.dumps(ops.kernel_report()))' 2>&1 | tee -a "$OUT/session.log"

step "gpu_suite" | tee -a "$OUT/session.log"
timeout 150 $PY bench/gpu_suite.py > "$OUT/gpu_suite.log" 2>&1
tail -3 "$OUT/gpu_suite.log" | tee -a "$OUT/session.log"

step "CUDA tests" | tee -a "$OUT/session.log"
(cd tests && timeout 130 $PY -m pytest -q -p no:cacheprovider --timeout 100 -k cuda \
   test_ops_propagate.py test_ops_fusion.py test_sampler.py test_grokking.py test_text.py) > "$OUT/tests.log" 2>&1
tail -4 "$OUT/tests.log" | tee -a "$OUT/session.log"
(cd tests && timeout 60 $PY -m pytest -q -p no:cacheprovider test_distributed.py) >> "$OUT/tests.log" 2>&1
tail -2 "$OUT/tests.log" | tee -a "$OUT/session.log"

step "torchrun NCCL, world size 1" | tee -a "$OUT/session.log"
for model in lightgcn graphsage; do
  timeout 60 $PY -m torch.distributed.run --nproc_per_node=1 -m glrec_fast.train --dataset ml-100k --split random \
    --model $model --epochs 3 --device cuda --out "/tmp/nccl_$model" >> "$OUT/nccl.log" 2>&1
  echo "$model exit $?" | tee -a "$OUT/session.log"
  grep -h "distributed:\|results\|^valid\|^test" "$OUT/nccl.log" | tail -4 | tee -a "$OUT/session.log"
done

step "GF-CF on Gowalla (fit + full evaluation)" | tee -a "$OUT/session.log"
t0=$(date +%s)
timeout 80 $PY -m glrec_fast.train --dataset gowalla --model gfcf --filter_rank 640 --ideal_weight 0.5 \
  --device cuda --out /tmp/gfcf > "$OUT/gfcf.log" 2>&1
echo "gfcf exit $?, $(( $(date +%s) - t0 )) s wall (python start, data, fit, valid + test ranking)" | tee -a "$OUT/session.log"
grep -h "fitted\|results\|^valid\|^test" "$OUT/gfcf.log" | tee -a "$OUT/session.log"

step "MF softmax + spectral recipe on Gowalla, 1-minute budget" | tee -a "$OUT/session.log"
timeout 110 $PY -m glrec_fast.train --dataset gowalla --model mf --emb_dim 256 --loss softmax --init spectral \
  --batch_size 4096 --lr 0.005 --reg_weight 0 --temperature 0.1 --num_negatives 1024 --grokking false \
  --epochs 1000 --patience 0 --time_budget 1.0 --trace_test true --device cuda --out /tmp/mf > "$OUT/mf.log" 2>&1
echo "mf exit $?" | tee -a "$OUT/session.log"
grep -h "epoch [0-9]*:\|results\|^valid\|^test" "$OUT/mf.log" | sed 's/.*epoch \([0-9]*\):.*elapsed_s=\([0-9.]*\).*test\/recall@20=\([0-9.]*\), test\/ndcg@20=\([0-9.]*\).*/epoch \1 elapsed \2 s test recall \3 ndcg \4/' | tail -40 | tee -a "$OUT/session.log"
step "done" | tee -a "$OUT/session.log"
