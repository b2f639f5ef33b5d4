#!/usr/bin/env bash
# One prepared command for a lent H100/H200 (its python3 has torch + transformers; deltalake,
# datasets, pydantic ... are installed by the caller into a folder on PYTHONPATH beforehand).
# Stages, each time-boxed so one hang cannot eat the budget (the whole script < 8 min); the
# headline figure first, diagnoses after it with what time is left (each skipped if short):
#   1. smoke: the qwen2vl-2b benchmark path with tiny dims on CUDA   (120 s; gates stage 2)
#   2. the throughput benchmark on a Qwen2-VL-2B-shaped model, bf16,
#      (a) (b) (c) (c2) and (c3) = static cache + CUDA graphs         (at most 240 s)
#   3. one batch of 256 on that model, stage by stage (where the time goes)       (50 s)
#   4. pytest over the GPU-marked tests                              (150 s)
#   5. static-cache decoding, CUDA-graph steps vs HF static, tiny models           (45 s)
#   6. the vision tower alone: packed attention vs HF's per-image loop (Qwen2-VL)  (45 s)
#   7. lean greedy loop vs HF generate, tiny models                                (45 s)
#   8. SmolVLM batching diagnosis, stage by stage                                 (45 s)
#   9. the vision tower alone, Qwen2.5-VL's windowed layers                        (45 s)
# Full log: $OUT/gpu_check.log; figures: $OUT/throughput.json. Summary table printed LAST.
#
#     OUT=/some/dir PYTHONPATH=/tmp/site bash scripts/gpu_check.sh
#     (the wheels for /tmp/site: scripts/gpu_wheels.sh, which also shows the device call)
#     DRY_RUN=1 bash scripts/gpu_check.sh   # every line on the CPU: tiny dims, tiny sizes
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-/tmp/gpu_check_out}"
mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1
export HF_HUB_DISABLE_PROGRESS_BARS=1 TOKENIZERS_PARALLELISM=false
TOTAL_BUDGET_S="${TOTAL_BUDGET_S:-470}"  # stay under 8 minutes end to end
DEVICE=cuda DTYPE=bfloat16
BENCH=(--specimens 512 --checkpoints 3 --batch-size 256 --max-new-tokens 32 --per-sample-limit 8
    --static-cache)
VISION=(--images 256 --repeats 3)
PROFILE=(--batch 256)
if [ "${DRY_RUN:-0}" = 1 ]; then
    DEVICE=cpu DTYPE=float32
    BENCH=(--shrink --specimens 12 --checkpoints 3 --batch-size 8 --max-new-tokens 8
        --per-sample-limit 3 --static-cache)
    VISION=(--shrink --images 8 --repeats 1)
    PROFILE=(--shrink --batch 8)
fi
BENCH_MAX_S=240
declare -A STATUS DURATION

stage() {  # stage NAME TIMEOUT_S CMD...: run time-boxed, record exit status and duration
    local name=$1 limit=$2 start=$SECONDS rc
    shift 2
    echo "=== [$name] $(date -u +%H:%M:%S) timeout ${limit}s: $*"
    timeout -k 10 "$limit" "$@"
    rc=$?
    STATUS[$name]=$rc
    DURATION[$name]=$((SECONDS - start))
    [ "$rc" = 124 ] && echo "=== [$name] TIMED OUT after ${limit}s"
    echo "=== [$name] exit $rc in ${DURATION[$name]}s"
    return "$rc"
}

optional() {  # optional NAME TIMEOUT_S CMD...: a stage, skipped when less time is left
    local name=$1 limit=$2
    if [ $((TOTAL_BUDGET_S - SECONDS)) -lt $((limit + 5)) ]; then
        echo "=== [$name] skipped: $((TOTAL_BUDGET_S - SECONDS))s left of ${TOTAL_BUDGET_S}s"
        STATUS[$name]=skipped
        return 0
    fi
    stage "$@"
}

main() {
rm -f "$OUT/throughput.json" "$OUT/throughput_smoke.json"  # never summarise a stale run
stage env 60 python3 -c '
import platform, torch, transformers
print("python", platform.python_version(), "torch", torch.__version__,
      "transformers", transformers.__version__)
print("card:", torch.cuda.get_device_name() if torch.cuda.is_available() else "NO CUDA")
'
nvidia-smi --query-gpu=name,memory.total,memory.used,driver_version --format=csv 2>/dev/null
df -h /tmp | tail -1

SMOKE_JSON="$OUT/throughput_smoke.json"
stage smoke 120 python3 scripts/bench_throughput.py --preset qwen2vl-2b --shrink \
    --specimens 8 --checkpoints 2 --batch-size 4 --max-new-tokens 4 --per-sample-limit 2 \
    --device "$DEVICE" --dtype "$DTYPE" --json "$SMOKE_JSON"
LEFT=$((TOTAL_BUDGET_S - SECONDS))
if [ "${STATUS[smoke]}" != 0 ]; then
    echo "=== [bench] skipped: the smoke stage failed (see above)"
    STATUS[bench]=skipped
else
    stage bench $((LEFT < BENCH_MAX_S ? LEFT : BENCH_MAX_S)) python3 scripts/bench_throughput.py \
        --preset qwen2vl-2b "${BENCH[@]}" --device "$DEVICE" --dtype "$DTYPE" \
        --json "$OUT/throughput.json"
fi

# where one batch's time goes (vision, rope positions, prefill, decoding 3 ways)
optional profile 50 python3 scripts/gpu_profile_batch.py "${PROFILE[@]}" \
    --device "$DEVICE" --dtype "$DTYPE"
GPU_TESTS=$(grep -l "mark.gpu" tests/test_*.py | tr '\n' ' ')
# shellcheck disable=SC2086
optional gpu_tests 150 python3 -m pytest -m gpu -q -p no:cacheprovider $GPU_TESTS
# static cache, decoding steps from CUDA graphs vs HF generate's static cache
optional decoding_static 45 python3 scripts/bench_decoding.py --device "$DEVICE" --repeats 5 \
    --static-cache qwen2_vl paligemma llava
# the vision tower alone, HF's per-image attention loop vs one call per image size
optional vision_plain 45 python3 scripts/bench_vision.py "${VISION[@]}" \
    --device "$DEVICE" --dtype "$DTYPE"
# the lean greedy loop vs HF generate per family (tiny models: per-step overhead)
optional decoding 45 python3 scripts/bench_decoding.py --device "$DEVICE" --repeats 5
# which stage of SmolVLM's batched forward leaves the single one on CUDA
optional smolvlm_diag 45 env DEV="$DEVICE" python3 scripts/gpu_diag_smolvlm.py
optional vision_windowed 45 python3 scripts/bench_vision.py --windowed "${VISION[@]}" \
    --device "$DEVICE" --dtype "$DTYPE"

echo
echo "================================ summary ================================"
for name in env smoke bench profile gpu_tests decoding_static vision_plain decoding smolvlm_diag \
    vision_windowed; do
    printf '%-10s exit %-8s %5ss\n' "$name" "${STATUS[$name]:-not run}" "${DURATION[$name]:-0}"
done
python3 - "$OUT/throughput.json" <<'PY'
import json, sys
from pathlib import Path

path = Path(sys.argv[1])
if not path.is_file():
    print(f"no {path.name}: no throughput figures measured")
    sys.exit(0)
r = json.loads(path.read_text())
fx = r.get("fixture", {})
print(f"card {r.get('card')}  torch {r.get('torch')}  transformers {r.get('transformers')}  "
      f"dtype {r.get('dtype')}  complete {r.get('complete')}")
print(f"model {fx.get('n_parameters', 0) / 1e9:.2f} B params, checkpoint "
      f"{fx.get('checkpoint_bytes', 0) / 1e9:.2f} GB; {r.get('specimens')} specimens x "
      f"{r.get('checkpoints')} checkpoints, batch {r.get('batch_size')}, "
      f"{r.get('max_new_tokens')} new tokens")
print(f"{'method':<24}{'samples/s':>10}{'seconds':>9}{'peak GiB':>10}  note")
for key, label in (("a_per_sample", "(a) per-sample loop"), ("b_batched_hf", "(b) batched HF"),
                   ("c_vieval_run", "(c) vieval run"), ("c2_vieval_rerun", "(c2) re-run"),
                   ("c3_vieval_static", "(c3) static cache")):
    m = r.get(key)
    if not m:
        print(f"{label:<24}{'-':>10}")
        continue
    peak = m.get("peak_gpu_gib")
    note = f"{m['samples_timed']} timed, extrapolated" if m.get("extrapolated") else ""
    if key.startswith("c"):
        note = "in process; " + ", ".join(f"{k.split(' ')[0]} {v:.1f}"
                                          for k, v in m.get("breakdown_s", {}).items())
    print(f"{label:<24}{m['samples_per_s']:>10.2f}{m['seconds']:>9.1f}"
          f"{'-' if peak is None else f'{peak:.1f}':>10}  {note}")
if r.get("complete"):
    print(f"texts checked {r['texts_checked']}: (b) differs on {r['b_mismatches']}, "
          f"(c) on {r['c_mismatches']}")
    if "c3_mismatches" in r:
        print(f"(c3) texts differing from (c): {r['c3_mismatches']}; c3/b={r['c3_over_b']:.2f}")
    print(f"c/a={r['c_over_a']:.1f} c/b={r['c_over_b']:.2f}")
PY
}

# a pipe, not exec > >(tee): the log is complete when the script returns
main 2>&1 | tee -a "$OUT/gpu_check.log"
