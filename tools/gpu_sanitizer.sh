#!/usr/bin/env bash
# Runs a small GPU subset of the tests under compute-sanitizer's memcheck: out-of-bounds and
# misaligned accesses, and invalid launches, of the Triton and CUDA C++ kernels.
#
#   tools/gpu_sanitizer.sh                        the default subset (below)
#   tools/gpu_sanitizer.sh tests/test_ops.py -k add_relu    any pytest arguments instead
#
# The default subset is the edge cases of test_reliability.py (empty batch, 1x1 maps, strided and
# expanded views, aliasing, NaN/Inf, fp16 overflow) on every available backend, at tiny sizes:
# memcheck makes each kernel launch much slower. PyTorch's caching allocator is turned off, so that
# an access past the end of a tensor leaves its allocation and memcheck sees it.
#
# Exit status: 0 when the tests pass and memcheck reports no error; otherwise nonzero. The memcheck
# summary is printed at the end; the full report is in $SANITIZER_LOG (default $TMPDIR/fused_resnet-memcheck.log).
set -u
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python}
LOG=${SANITIZER_LOG:-${TMPDIR:-/tmp}/fused_resnet-memcheck.log}

if ! command -v compute-sanitizer >/dev/null 2>&1; then
    echo "compute-sanitizer is not on the PATH (it ships with the CUDA toolkit, in \$CUDA_HOME/bin); nothing run"
    exit 0
fi
if ! "$PYTHON" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    echo "no CUDA device; nothing run"
    exit 0
fi

if [ $# -eq 0 ]; then
    set -- tests/test_reliability.py -m "not gpu" -k "not concurrent and not export and not threads"
fi

# Every kernel, Triton's included, runs in the pytest process; its subprocesses (ptxas) launch none.
# FUSED_RESNET_AUTOTUNE=0: backend="auto" takes its first candidate instead of timing them all.
PYTORCH_NO_CUDA_MEMORY_CACHING=1 FUSED_RESNET_AUTOTUNE=0 \
    compute-sanitizer --tool memcheck --target-processes application-only --error-exitcode 99 --print-limit 50 \
    --log-file "$LOG" \
    "$PYTHON" -m pytest -q -p no:cacheprovider "$@"
status=$?

echo "--- compute-sanitizer memcheck ($LOG) ---"
grep -E "ERROR SUMMARY|Invalid|out of bounds|misaligned" "$LOG" | sort | uniq -c | sort -rn | head -20
case $status in
    0) echo "memcheck: no errors, tests passed" ;;
    99) echo "memcheck: errors found (see $LOG)" ;;
    *) echo "pytest or compute-sanitizer failed with status $status (see $LOG)" ;;
esac
exit $status
