#!/usr/bin/env bash
# The first GPU run of tg_kernels in one call: extension, GPU tests, benchmark.
#
#   bash bench/gpu_check.sh            # on a machine with a CUDA GPU; about 8 minutes at most
#
# Steps, each bounded so the whole run ends within TG_GPU_CHECK_BUDGET_S seconds (default 450):
#   1. environment: nvidia-smi, python / torch / triton versions, the GPU (env.txt)
#   2. the extension: reuse tg_kernels/_C.abi3.so when it loads, has CUDA kernels and was built for
#      this GPU's arch (e.g. an sm_90 build made on a CPU machine and carried over); otherwise build
#      it in place for the visible arch (`setup.py build_ext --inplace`, TORCH_CUDA_ARCH_LIST set to
#      the GPU's compute capability). A failed build is logged; the Triton and torch paths still run.
#   3. the GPU tests: `pytest -m gpu` with TRITON_INTERPRET unset (compiled Triton, CUDA kernels),
#      in parallel workers when pytest-xdist is installed (gpu_tests.log, gpu_tests.xml)
#   4. the benchmark: `bench/run.py --device cuda --quick` (quick/), then, while time remains, the
#      full run one case family at a time (channel_gate/, gated_layers/, models/)
# Everything goes to bench/results/<gpu name>/ as it is produced (a log per step and summary.txt,
# rewritten after every step), so a run cut short keeps what it finished.
#
# Environment: PYTHON (default python3, else python), TG_GPU_CHECK_BUDGET_S (seconds, default 450),
# TG_GPU_CHECK_OUT (results folder, default bench/results/<gpu name>), PYTEST_WORKERS (default 8),
# TG_GPU_CHECK_ARCHIVE (a .tar.gz path: the results folder is packed there after every step, for
# machines whose outputs come back as a few files; e.g. TG_GPU_CHECK_ARCHIVE=$OUT/gpu_check.tar.gz).
set -uo pipefail
cd "$(dirname "$0")/.."
start=$(date +%s)
budget=${TG_GPU_CHECK_BUDGET_S:-450}
PY=${PYTHON:-$(command -v python3 || command -v python)}
unset TRITON_INTERPRET TG_KERNELS_BACKEND
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

elapsed() { echo $(( $(date +%s) - start )); }
left() { echo $(( budget - $(elapsed) )); }

gpu=$("$PY" -c "import torch; print(torch.cuda.get_device_name(0).replace(' ', '-'))" 2>/dev/null) || {
    echo "gpu_check: torch sees no CUDA device; nothing to check" >&2
    exit 2
}
out=${TG_GPU_CHECK_OUT:-bench/results/$gpu}
mkdir -p "$out"
summary="$out/summary.txt"
: >"$summary"
note() {
    echo "$*" | tee -a "$summary"
    if [[ -n "${TG_GPU_CHECK_ARCHIVE:-}" ]]; then
        tar -czf "$TG_GPU_CHECK_ARCHIVE.tmp" -C "$(dirname "$out")" "$(basename "$out")" &&
            mv "$TG_GPU_CHECK_ARCHIVE.tmp" "$TG_GPU_CHECK_ARCHIVE"
    fi
}
# run_step NAME SECONDS COMMAND...: bounded, logged to $out/NAME.log, status in summary.txt
run_step() {
    local name=$1 limit=$2
    shift 2
    if (( limit < 20 )); then
        note "$name: skipped (${limit} s left)"
        return 1
    fi
    local t0=$(date +%s)
    echo "=== $name (limit ${limit} s, at $(elapsed) s)"
    timeout --kill-after=10 "$limit" "$@" 2>&1 | tee "$out/$name.log"
    local rc=${PIPESTATUS[0]}
    local status="ok"
    (( rc == 124 || rc == 137 )) && status="timed out"
    (( rc != 0 && rc != 124 && rc != 137 )) && status="failed (exit $rc)"
    note "$name: $status in $(( $(date +%s) - t0 )) s"
    return "$rc"
}

note "gpu_check on $gpu, $(date -u +%Y-%m-%dT%H:%M:%SZ), budget ${budget} s, git $(git rev-parse --short HEAD 2>/dev/null || echo '?')"

# 1. environment
{
    nvidia-smi 2>&1 || true
    "$PY" - <<'PY'
import platform, torch
print("python", platform.python_version(), "torch", torch.__version__, "cuda", torch.version.cuda)
try:
    import triton
    print("triton", triton.__version__)
except Exception as exc:
    print("triton: not importable:", exc)
p = torch.cuda.get_device_properties(0)
print("gpu", p.name, f"sm_{p.major}{p.minor}", p.multi_processor_count, "SMs", round(p.total_memory / 2**30), "GiB")
PY
} >"$out/env.txt" 2>&1
cat "$out/env.txt"

# 2. the extension: reuse it if it fits this GPU and this torch, else build it in place
arch=$("$PY" -c "import torch; print('%d.%d' % torch.cuda.get_device_capability(0))")
ext_ok() {
    "$PY" - "$arch" <<'PY'
import sys, warnings
warnings.simplefilter("ignore")
import torch, tg_kernels
info = tg_kernels.build_info()
arches = (info.get("cuda_arch_list") or "").replace(" ", ";").split(";")
fits = info["extension_loaded"] and info["with_cuda"] and any(a.split("+")[0] == sys.argv[1] for a in arches)
fits = fits and torch._C._dispatch_has_kernel_for_dispatch_key("tg_kernels::channel_gate_forward_kernel", "CUDA")
print("extension:", {k: info[k] for k in ("extension_loaded", "extension_error", "with_cuda", "cuda_arch_list",
      "torch_version", "runtime_torch_version")})
sys.exit(0 if fits else 1)
PY
}
if ext_ok; then
    note "extension: reused (built for sm_${arch/./})"
else
    build_limit=$(( $(left) - 270 ))  # keep 4.5 minutes for the tests and the benchmark
    (( build_limit > 180 )) && build_limit=180
    if run_step build "$build_limit" env TG_KERNELS_CUDA=1 TORCH_CUDA_ARCH_LIST="$arch" MAX_JOBS="${MAX_JOBS:-16}" \
        "$PY" setup.py build_ext --inplace && ext_ok; then
        note "extension: built here for sm_${arch/./}"
    else
        note "extension: unavailable (see build.log); the cuda backend's tests skip, Triton and torch still run"
    fi
fi

# 3. the GPU tests (compiled Triton, CUDA kernels, the layers on CUDA tensors)
workers=()
if "$PY" -c "import xdist" 2>/dev/null; then
    workers=(-n "${PYTEST_WORKERS:-8}")
fi
test_limit=$(( $(left) - 120 ))  # keep 2 minutes for the quick benchmark
(( test_limit > 240 )) && test_limit=240
run_step gpu_tests "$test_limit" "$PY" -m pytest -m gpu -q -rfEs "${workers[@]}" -p no:cacheprovider \
    --junitxml="$out/gpu_tests.xml"
grep -E "passed|failed|error" "$out/gpu_tests.log" 2>/dev/null | tail -1 | sed 's/^/gpu_tests: /' >>"$summary"

# 4. the benchmark: quick first, then the full run per family while time remains
run_step bench_quick $(( $(left) - 5 )) "$PY" bench/run.py --device cuda --quick --out "$out/quick"
for family in gated_layers channel_gate models; do
    run_step "bench_$family" $(( $(left) - 5 )) "$PY" bench/run.py --device cuda --cases "$family" --out "$out/$family"
    rc=$?
    (( rc == 124 || rc == 137 )) && break  # out of time; a failed family does not stop the next
done
note "done in $(elapsed) s"
