#!/usr/bin/env bash
# The CUDA kernels on a GPU machine, under one hard time limit: install qtool (with the torch
# already installed there when it has CUDA; `pip install torch` only when there is none), build
# the kernels with nvcc, run tests/kernels/test_cuda.py, then time the CUDA ops against fp32
# (and fp16) torch on the GPU at the shapes of `qtool bench --kernels`.
#
#   benchmarks/cuda_check.sh OUT_DIR [LIMIT_SECONDS]      (default 480)
#
# Writes into OUT_DIR: summary.txt (one line per step: rc and seconds), env.txt (GPU, driver,
# nvcc, torch), install.log, build.log, test_cuda.log + test_cuda.xml, cuda_bench.log +
# cuda_bench.json. Every step runs under `timeout` with what is left of the limit, so the whole
# script ends within LIMIT_SECONDS (+ 10 s to kill a step). Exit status: 0 when all steps passed.
# `qtool bench --kernels` itself times the CPU kernels only; the GPU timing is the inline script
# at the end.
set -uo pipefail
out=${1:?usage: benchmarks/cuda_check.sh OUT_DIR [LIMIT_SECONDS]}
limit=${2:-480}
mkdir -p "$out" && out=$(cd "$out" && pwd)
cd "$(dirname "$0")/.." || exit 1
deadline=$((SECONDS + limit))
failed=0
: > "$out/summary.txt"

# step NAME CMD...: run CMD with the time that is left, output to NAME.log, one summary line.
step() {
  local name=$1 t0=$SECONDS rc left=$((deadline - SECONDS))
  shift
  if [ "$left" -le 5 ]; then
    echo "$name: skipped, time limit reached" | tee -a "$out/summary.txt"
    failed=1
    return 1
  fi
  timeout -k 10 "$left" "$@" > "$out/$name.log" 2>&1
  rc=$?
  echo "$name: rc=$rc, $((SECONDS - t0)) s$([ $rc -eq 124 ] && echo ', timed out')" | tee -a "$out/summary.txt"
  [ $rc -eq 0 ] || failed=1
  return $rc
}

# --- environment: a CUDA toolkit for the build (torch's wheels carry no nvcc)
for root in "${CUDA_HOME:-}" /usr/local/cuda /usr/local/cuda-*; do
  if [ -n "$root" ] && [ -x "$root/bin/nvcc" ]; then
    export CUDA_HOME=$root PATH=$root/bin:$PATH
    break
  fi
done
export MAX_JOBS=${MAX_JOBS:-$(nproc)} QTOOL_KERNEL_CACHE=${QTOOL_KERNEL_CACHE:-$out/kernel-cache}
export PIP_BREAK_SYSTEM_PACKAGES=1 PIP_DISABLE_PIP_VERSION_CHECK=1
{
  nvidia-smi 2>&1 | head -20
  echo "nvcc: $(command -v nvcc || echo none) $(nvcc --version 2>/dev/null | tail -1)"
  echo "cpu: $(grep -m1 'model name' /proc/cpuinfo)"
} > "$out/env.txt"

# --- install: into the Python that has torch (a fresh venv only when none has it)
py=${PYTHON:-python3}
if ! "$py" -c "import torch" > /dev/null 2>&1; then
  venv=${VENV:-/tmp/qtool-cuda-venv}
  "$py" -m venv "$venv" && py=$venv/bin/python
fi
install_qtool() {
  if ! "$py" -c "import torch" 2> /dev/null; then
    "$py" -m pip install torch || return 1  # the default wheel on Linux x86-64 is a CUDA build
  fi
  if ! "$py" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    echo "torch $("$py" -c 'import torch; print(torch.__version__)') sees no GPU (a CPU build, or no driver)"
    return 1
  fi
  # no build isolation and no dependencies first (works offline), the full install otherwise
  "$py" -m pip install --no-build-isolation --no-deps -e . || "$py" -m pip install -e . || return 1
  "$py" -c "import click, rich, numpy, pytest, ninja" 2>/dev/null || "$py" -m pip install click rich numpy pytest ninja pyyaml
}
export -f install_qtool
export py
step install bash -c install_qtool
"$py" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'gpu', torch.cuda.is_available() and torch.cuda.get_device_name(0))" >> "$out/env.txt" 2>&1

# --- build (CUDA sources join when torch sees a GPU and CUDA_HOME has nvcc)
step build "$py" -c "
import torch
from qtool.lowbit import ops
print('backend', ops.backend())
cuda = torch._C._dispatch_has_kernel_for_dispatch_key('qtool::lowbit_gemm', 'CUDA')
print('CUDA kernels registered:', cuda)
raise SystemExit(0 if ops.backend() == 'extension' and cuda else 1)
"

# --- tests: the CUDA tests compile with nvcc and compare every op on the GPU with the reference
step test_cuda "$py" -m pytest -rs -v tests/kernels/test_cuda.py --junitxml="$out/test_cuda.xml"

# --- timing on the GPU: CUDA events, medians of alternating runs, weights rotated past L2
step cuda_bench "$py" - "$out/cuda_bench.json" << 'EOF'
import json, statistics, sys
import torch
import torch.nn.functional as F
from qtool.lowbit import ops, reference as ref

dev, g = "cuda", torch.Generator().manual_seed(0)
rows = []

def median_ms(fns, repeats=25, warmup=5):
    for _ in range(warmup):
        for fn in fns:
            fn()
    times = [[] for _ in fns]
    for _ in range(repeats):
        for i, fn in enumerate(fns):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record(); fn(); end.record(); torch.cuda.synchronize()
            times[i].append(start.elapsed_time(end))
    return [statistics.median(t) for t in times]

def rotation(t, min_bytes=512 << 20):  # distinct copies, so that no side runs from the 50 MB L2
    copies = [t.clone() for _ in range(max(2, -(-min_bytes // (t.numel() * t.element_size()))))]
    state = {"i": 0}
    def next_copy():
        state["i"] = (state["i"] + 1) % len(copies)
        return copies[state["i"]]
    return next_copy

def record(name, shape, fns, labels, exact):
    times = median_ms(fns)
    row = {"name": name, "shape": list(shape), "exact_vs_reference": exact}
    row.update({f"{k}_ms": round(t, 4) for k, t in zip(labels, times)})
    row.update({f"speedup_vs_{k}": round(t / times[0], 2) for k, t in zip(labels[1:], times[1:])})
    rows.append(row)
    print(json.dumps(row), flush=True)

for M in (1, 16, 64):
    for bits in (4, 3):
        K = N = 4096
        codes = torch.randint(-(2 ** (bits - 1)) + 1, 2 ** (bits - 1), (N, K), generator=g)
        scale = torch.rand(N, 1, generator=g) * 0.01
        w_cpu = ref.pack_int4(codes) if bits == 4 else ref.pack_int3(codes)
        x = torch.randn(M, K, generator=g)
        xq, xs = ref.quantize_rows_i8(x)
        out = torch.ops.qtool.lowbit_gemm_i8(xq.to(dev), xs.to(dev), w_cpu.to(dev), scale.to(dev), bits, K, K)
        exact = torch.equal(out.cpu(), ref.lowbit_gemm_i8(xq, xs, w_cpu, scale, bits, K, K))
        w, dense = rotation(w_cpu.to(dev)), (codes.float() * scale).to(dev)
        w32, w16 = rotation(dense), rotation(dense.half())
        xd, xqd, xsd, sd, x16 = x.to(dev), xq.to(dev), xs.to(dev), scale.to(dev), x.to(dev).half()
        record(f"int{bits}_gemm_i8", (M, K, N), [
            lambda: torch.ops.qtool.lowbit_gemm_i8(*torch.ops.qtool.quantize_rows_i8(xd), w(), sd, bits, K, K),
            lambda: torch.matmul(xd, w32().t()), lambda: torch.matmul(x16, w16().t())], ["ours", "fp32", "fp16"], exact)
        if bits == 4:
            close = torch.allclose(torch.ops.qtool.lowbit_gemm(xd, w(), sd, bits, K, K).cpu(), x @ (codes.float() * scale).T,
                                   rtol=1e-4, atol=1e-3)
            record("int4_gemm", (M, K, N), [lambda: torch.ops.qtool.lowbit_gemm(xd, w(), sd, bits, K, K),
                                            lambda: torch.matmul(xd, w32().t())], ["ours", "fp32"], close)

for M, K, N in [(3136, 576, 64), (784, 1152, 128), (196, 2304, 256), (49, 4608, 512), (1, 4096, 4096), (64, 4096, 4096)]:
    a, wt = torch.randn(M, K, generator=g), torch.randn(N, K, generator=g)
    ab, wb, s = ref.pack_binary(a), ref.pack_binary(wt), torch.rand(N, generator=g)
    out = torch.ops.qtool.binary_gemm(ab.to(dev), wb.to(dev), K, s.to(dev))
    exact = torch.equal(out.cpu(), ref.binary_gemm(ab, wb, K, s))
    abd, wbd, sd, ad, wtd = ab.to(dev), wb.to(dev), s.to(dev), a.to(dev), wt.t().contiguous().to(dev)
    record("binary_gemm", (M, K, N), [lambda: torch.ops.qtool.binary_gemm(abd, wbd, K, sd),
                                      lambda: torch.matmul(ad, wtd)], ["ours", "fp32"], exact)

for N, C, H, W, O in [(1, 64, 56, 56, 64), (1, 128, 28, 28, 128), (1, 256, 14, 14, 256), (1, 512, 7, 7, 512)]:
    x, weight = torch.randn(N, C, H, W, generator=g), torch.randn(O, C, 3, 3, generator=g)
    wb, s = ref.pack_binary(ref.binary_weight_order(weight).contiguous()), torch.rand(O, generator=g)
    args = (C, [3, 3], [1, 1], [1, 1], [1, 1])
    out = torch.ops.qtool.binary_conv2d(x.to(dev), wb.to(dev), *args, s.to(dev))
    exact = torch.equal(out.cpu(), ref.binary_conv2d(x, wb, *args, s))
    xd, wbd, sd, wd = x.to(dev), wb.to(dev), s.to(dev), weight.to(dev)
    record("binary_conv2d", (N, C, H, W, O, 3, 3), [lambda: torch.ops.qtool.binary_conv2d(xd, wbd, *args, sd),
                                                    lambda: F.conv2d(xd, wd, padding=1)], ["ours", "fp32"], exact)

json.dump({"gpu": torch.cuda.get_device_name(0), "torch": torch.__version__, "cuda": torch.version.cuda,
           "method": "CUDA events, median of 25 alternating runs after 5 warm-ups; linear weights rotated over "
                     ">= 512 MiB per side; fp32 matmul without TF32 (torch default)", "rows": rows},
          open(sys.argv[1], "w"), indent=1)
sys.exit(0 if all(r["exact_vs_reference"] for r in rows) else 1)
EOF

echo "total: $SECONDS s of $limit s" | tee -a "$out/summary.txt"
exit $failed
