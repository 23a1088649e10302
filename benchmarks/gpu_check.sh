#!/usr/bin/env bash
# One prepared check on one GPU, in under 8 minutes (H100/H200 class): the CUDA tests, the float32 and float16
# equality against the CPU goldens (../shared/adm_reference), the TF32 and rank-count checks, and the sampling
# throughput at 256 px, batch 16, float16 (ADM plain, the official two-pass PAG, ours).
#
#   bash benchmarks/gpu_check.sh [OUTPUT_FOLDER]      (default: $OUT, else gpu_check_out/)
#
# Writes OUTPUT_FOLDER/gpu_check.md (the summary table) with pytest.txt, numerics.json, throughput.md and
# throughput.json beside it. Each step has its own time limit, and a failed step does not stop the others; the exit
# status is non-zero if any step failed.
set -u
cd "$(dirname "$0")/.."
OUT_DIR="${1:-${OUT:-gpu_check_out}}"
mkdir -p "$OUT_DIR"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
status=0
summary="$OUT_DIR/gpu_check.md"

step() {  # step NAME SECONDS COMMAND...: run with a time limit, log to OUT_DIR/NAME.log, note the result
    local name=$1 limit=$2
    shift 2
    local start=$SECONDS
    timeout "$limit" "$@" >"$OUT_DIR/$name.log" 2>&1
    local rc=$?
    [ $rc -ne 0 ] && status=1
    echo "| $name | $([ $rc -eq 0 ] && echo ok || echo "FAILED (exit $rc)") | $((SECONDS - start)) s |" >>"$summary.steps"
}

python -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)" || { echo "gpu_check: no CUDA device" >&2; exit 2; }
: >"$summary.steps"

# 1. The CUDA tests, and the suites whose CPU/GPU split changed with CUDA present (process groups, GPU mapping).
step pytest 150 python -m pytest -q -rs \
    tests/adm/test_attention_backends.py tests/adm/test_fp16.py tests/adm/test_dist_logger.py tests/common/test_launch.py \
    tests/run/test_device_placement.py tests/run/test_precision.py tests/adm/test_reference_numerics.py
cp "$OUT_DIR/pytest.log" "$OUT_DIR/pytest.txt" 2>/dev/null

# 2. Goldens in float32 / float16, TF32 drift of sampled uint8 values, 1 vs 2 ranks with --deterministic.
step numerics 120 python benchmarks/gpu_numerics.py --out "$OUT_DIR/numerics.json"

# 3. Throughput at the paper's setting: ADM-256, DDIM 25, batch 16, float16 torso, channels_last as an extra row.
step throughput 180 python benchmarks/sampling_throughput.py --device cuda --image_size 256 --batch_size 16 \
    --use_fp16 --steps 25 --repeats 3 --warmup 1 --extra channels_last --output "$OUT_DIR/throughput.json"
sed -n '/^| variant/,$p' "$OUT_DIR/throughput.log" >"$OUT_DIR/throughput.md" 2>/dev/null

{
    echo "# GPU check"
    echo
    python - <<'EOF'
import torch
print(f"device {torch.cuda.get_device_name()}, torch {torch.__version__}, CUDA {torch.version.cuda}, "
      f"cuDNN {torch.backends.cudnn.version()}")
EOF
    echo
    echo "| step | result | time |"
    echo "| --- | --- | --- |"
    cat "$summary.steps"
    echo
    echo "## pytest"
    echo
    tail -n 15 "$OUT_DIR/pytest.log" | sed 's/^/    /'
    echo
    echo "## numerics"
    echo
    python - "$OUT_DIR/numerics.json" <<'EOF'
import json, sys
try:
    report = json.load(open(sys.argv[1]))
except (OSError, ValueError) as exc:
    print(f"no report: {exc}")
    raise SystemExit
print("| check | figure | value |")
print("| --- | --- | --- |")
for check in ("golden", "tf32", "ranks"):
    for key, value in (report.get(check) or {}).items():
        if isinstance(value, dict):
            for figure, number in value.items():
                print(f"| {check} {key} | {figure} | {number} |")
        else:
            print(f"| {check} | {key} | {value} |")
EOF
    echo
    echo "## sampling throughput (256 px, batch 16, float16, DDIM 25)"
    echo
    grep -m1 "^ADM-256" "$OUT_DIR/throughput.log" 2>/dev/null
    echo
    cat "$OUT_DIR/throughput.md" 2>/dev/null
} >"$summary"
rm -f "$summary.steps"
cat "$summary"
exit $status
