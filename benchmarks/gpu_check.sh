#!/usr/bin/env bash
# One-shot GPU check of hf-ratequant: machine and versions, import checks, the CUDA tests of the Triton kernels and
# of the fused decode attention, then benchmarks/gpu_speed.py; its summary table is printed last.
#
#   bash benchmarks/gpu_check.sh                 # on the GPU machine, from anywhere (about 8 minutes at most)
#   bash benchmarks/gpu_check.sh --quick         # arguments go to gpu_speed.py
#   GPU_CHECK_DEVICE=cpu bash benchmarks/gpu_check.sh --smoke    # rehearsal on a CPU-only machine
#
# Logs and result files are copied to "${OUT:-/tmp}" (the folder whose files come back from the GPU machine).
# Environment: GPU_CHECK_DEVICE (cuda), GPU_CHECK_TAG (h200; cpu-smoke with GPU_CHECK_DEVICE=cpu),
# GPU_CHECK_TESTS_K (pytest -k selection, default "not cpu": the CUDA cases), GPU_CHECK_TEST_TIMEOUT (150),
# GPU_CHECK_BENCH_TIMEOUT (330), GPU_CHECK_SKIP_TESTS=1 to skip the tests.
set -uo pipefail

cd "$(dirname "$0")/.." || exit 1
OUT_DIR="${OUT:-/tmp}"
mkdir -p "$OUT_DIR"
DEVICE="${GPU_CHECK_DEVICE:-cuda}"
if [ "$DEVICE" = "cpu" ]; then
    TAG="${GPU_CHECK_TAG:-cpu-smoke}"
    DEVICE_ARGS=(--device cpu --dtype float32)
else
    TAG="${GPU_CHECK_TAG:-h200}"
    DEVICE_ARGS=(--device "$DEVICE")
fi
TEST_TIMEOUT="${GPU_CHECK_TEST_TIMEOUT:-150}"
BENCH_TIMEOUT="${GPU_CHECK_BENCH_TIMEOUT:-330}"
PY="${PYTHON:-python}"
# The package runs from the checkout (no pip install: the GPU machine has no network for its dependencies).
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export PYTORCH_CUDA_ALLOC_CONF="${PYTORCH_CUDA_ALLOC_CONF:-expandable_segments:True}"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
unset TRITON_INTERPRET  # the real kernels, compiled for the GPU
SUMMARY="$OUT_DIR/gpu_check_summary.txt"
: >"$SUMMARY"

step() { printf '\n======== %s (%s) ========\n' "$1" "$(date +%T)"; }
note() { echo "$*" | tee -a "$SUMMARY"; }
START=$SECONDS

step "machine"
if command -v nvidia-smi >/dev/null 2>&1; then
    nvidia-smi --query-gpu=name,memory.total,memory.used,driver_version,clocks.max.sm --format=csv 2>&1 \
        | tee "$OUT_DIR/nvidia-smi.txt"
    nvidia-smi 2>&1 | head -20 >>"$OUT_DIR/nvidia-smi.txt"
else
    echo "no nvidia-smi"
fi
echo "repo: $(git rev-parse --short HEAD 2>/dev/null || echo '?')" \
    "($(git status --porcelain 2>/dev/null | wc -l) changed files)"

step "versions and imports"
# One interpreter for all of it: versions, which modules are missing, and whether importing hf_ratequant (and
# the modules the cache uses) works without datasets/gguf/matplotlib, blocked here even where installed.
"$PY" - <<'EOF' 2>&1 | tee "$OUT_DIR/gpu_check_imports.txt"
import importlib.util
import platform
import sys

print("python", platform.python_version())
names = ("torch", "transformers", "triton", "accelerate", "huggingface_hub", "safetensors", "tqdm", "datasets",
         "gguf", "matplotlib", "pytest", "hypothesis", "numpy")
missing = [n for n in names if importlib.util.find_spec(n) is None]
print("missing modules:", ", ".join(missing) or "none")
from importlib import metadata

for n in names:
    if n not in missing:
        try:
            print(f"  {n} {metadata.version(n)}")
        except metadata.PackageNotFoundError:
            print(f"  {n} (no metadata)")
import torch

print("torch", torch.__version__, "cuda", torch.version.cuda, "available", torch.cuda.is_available())
if torch.cuda.is_available():
    print("device", torch.cuda.get_device_name(0), "capability", torch.cuda.get_device_capability(0),
          f"{torch.cuda.get_device_properties(0).total_memory / 2**30:.1f} GiB")


class Block:
    """Make datasets, gguf and matplotlib unimportable, as on a machine that lacks them."""

    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("datasets", "gguf", "matplotlib"):
            raise ImportError(f"{name} blocked by gpu_check.sh")
        return None


sys.meta_path.insert(0, Block())
try:
    import hf_ratequant
    from hf_ratequant import attention, cache, ops  # noqa: F401

    print("LEAN-IMPORT OK: import hf_ratequant (cache, ops, attention) works without datasets/gguf/matplotlib")
except Exception as err:
    print(f"LEAN-IMPORT FAIL: {type(err).__name__}: {err}")
try:
    from hf_ratequant import triton_kernels  # noqa: F401

    print("hf_ratequant.triton_kernels: importable; decode_attention:", hasattr(triton_kernels, "decode_attention"))
except Exception as err:
    print(f"hf_ratequant.triton_kernels: NOT importable ({type(err).__name__}: {err})")
if torch.cuda.is_available():
    from hf_ratequant import ops

    print("Triton kernels on this GPU:", ops.triton_unavailable_reason(0) or "available")
EOF
grep -E "^(missing modules|LEAN-IMPORT|hf_ratequant.triton_kernels|Triton kernels)" \
    "$OUT_DIR/gpu_check_imports.txt" >>"$SUMMARY"

step "CUDA tests"
TESTS=()
for f in tests/test_triton_kernels.py tests/test_fused_attention.py; do
    if [ -f "$f" ]; then TESTS+=("$f"); else note "tests: $f does not exist, skipped"; fi
done
if [ "${GPU_CHECK_SKIP_TESTS:-0}" = "1" ]; then
    note "tests: skipped (GPU_CHECK_SKIP_TESTS=1)"
elif ! "$PY" -c "import pytest" >/dev/null 2>&1; then
    note "tests: pytest is not installed, skipped"
elif [ "${#TESTS[@]}" -eq 0 ]; then
    note "tests: no test file, skipped"
else
    timeout -k 10 "$TEST_TIMEOUT" "$PY" -m pytest -q -x -rfEs -k "${GPU_CHECK_TESTS_K:-not cpu}" \
        "${TESTS[@]}" 2>&1 | tee "$OUT_DIR/gpu_tests.log"
    rc=${PIPESTATUS[0]}
    case $rc in
        0) note "tests: passed ($(tail -1 "$OUT_DIR/gpu_tests.log"))" ;;
        5) note "tests: none selected (pytest rc 5)" ;;
        124 | 137) note "tests: TIMED OUT after ${TEST_TIMEOUT} s (last line: $(tail -1 "$OUT_DIR/gpu_tests.log"))" ;;
        *) note "tests: FAILED, rc $rc ($(tail -1 "$OUT_DIR/gpu_tests.log"))" ;;
    esac
fi
note "time so far: $((SECONDS - START)) s"

step "gpu_speed.py"
timeout -k 15 "$BENCH_TIMEOUT" "$PY" benchmarks/gpu_speed.py "${DEVICE_ARGS[@]}" --tag "$TAG" "$@" 2>&1 \
    | tee "$OUT_DIR/gpu_speed_$TAG.log"
rc=${PIPESTATUS[0]}
case $rc in
    0) note "gpu_speed: finished" ;;
    124 | 137) note "gpu_speed: stopped by the ${BENCH_TIMEOUT} s timeout (partial results)" ;;
    *) note "gpu_speed: exit code $rc" ;;
esac
for ext in md json; do
    f="benchmarks/results/gpu_speed_$TAG.$ext"
    if [ -f "$f" ]; then cp "$f" "$OUT_DIR/" 2>/dev/null || true; fi
done
note "total: $((SECONDS - START)) s"

step "summary"
cat "$SUMMARY"
echo
if [ -f "benchmarks/results/gpu_speed_$TAG.md" ]; then
    cat "benchmarks/results/gpu_speed_$TAG.md"
else
    echo "(no benchmarks/results/gpu_speed_$TAG.md)"
fi
