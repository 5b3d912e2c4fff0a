"""A W4A4 resnet20 on the fused integer ops (``qtool.lowbit.fused.fuse``) against the same network
in fp32 torch (batch norm folded, float weights: ``qtool.lowbit.runtime.dequantized(model,
float_weights=True)``), one thread, batch 1 and 32; what wrote docs/results/fused-kernels.json.

    python benchmarks/fused_bench.py                       # seeded resnet20, calibrated W4A4
    python benchmarks/fused_bench.py --checkpoint CKPT.pt  # a qtool checkpoint (graph-prepared, or
                                                           # float: prepared W4A4 and calibrated here)
    python benchmarks/fused_bench.py --bits 3 --json out.json
    # the AVX2 code path on an AVX-512 CPU, torch limited to AVX2 as well:
    QTOOL_KERNEL_ISA=avx2 ONEDNN_MAX_CPU_ISA=AVX2 ATEN_CPU_CAPABILITY=avx2 MKL_ENABLE_INSTRUCTIONS=AVX2 \
        python benchmarks/fused_bench.py --json docs/results/fused-kernels-avx2-path.json

Method: the fused model and the fp32 model run in turn (``qtool.timing.interleaved_ms``: a noisy
neighbour slows both alike), after warm-up; medians of ``--repeats`` runs (at least 20), in ``--rounds``
separate rounds (the JSON lists each; the row is the round with the median speedup). The
fake-quant model is timed afterwards on its own, for information (interleaved with the other two
it slowed fp32 down by up to 3x). Before timing, the fused model's logits are
compared with the fake-quant model's (they are equal bit for bit, see docs/kernels.md); the
JSON records the difference, the ISA the kernels ran and the CPU's model and flags line.
Weights do not change the timing (the kernels are dense), so a seeded, calibrated model times
the same as a trained one.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
DEFAULT_JSON = REPO / "docs" / "results" / "fused-kernels.json"
# what decides the ISA of either side (recorded in the command line of the JSON)
ENV_KEYS = ("QTOOL_KERNEL_ISA", "QTOOL_KERNELS", "ONEDNN_MAX_CPU_ISA", "ATEN_CPU_CAPABILITY", "MKL_ENABLE_INSTRUCTIONS")


def cpu_identity() -> dict:
    """The CPU's model name and /proc/cpuinfo flags line (what the ISA dispatch sees)."""
    model, flags = platform.processor() or platform.machine(), ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name" and model in ("", platform.machine(), platform.processor()):
                model = value.strip()
            if key.strip() in ("flags", "Features") and not flags:
                flags = value.strip()
    except OSError:
        pass
    return {"model": model, "flags": flags, "machine": platform.machine()}


def calibrated_resnet20(bits: int, seed: int = 0, batch: int = 32) -> torch.nn.Module:
    from qtool.models.resnet import resnet20
    from qtool.quant.prepare import prepare

    torch.manual_seed(seed)
    model = prepare(resnet20(), bits=bits, act_bits=bits)
    with torch.no_grad():
        model(torch.randn(batch, 3, 32, 32))  # initialises every step size
    return model.eval()


def load_checkpoint(path: str, bits: int) -> torch.nn.Module:
    from qtool.checkpoint import load_model
    from qtool.quant.graph import GRAPH_KEY
    from qtool.quant.prepare import prepare

    model, payload = load_model(path)
    if GRAPH_KEY not in (payload.get("plan") or {}):
        model = prepare(model, bits=bits, act_bits=bits)
        with torch.no_grad():
            model(torch.randn(32, payload["in_channels"], payload["image_size"], payload["image_size"]))
    return model.eval()


@torch.no_grad()
def bench_fused(model: torch.nn.Module, batches=(1, 32), repeats: int = 30, warmup: int = 5, rounds: int = 3,
                image_size: int = 32, in_channels: int = 3, weights: str = "auto") -> dict:
    """Latency of ``fuse(model)`` against its fp32 network at each batch size (one thread):
    ``rounds`` separate interleaved measurements of ``repeats`` runs each; the row reports the
    round with the median speedup and lists every round (a shared machine's load comes in phases
    longer than one round)."""
    from qtool.lowbit import ops
    from qtool.lowbit.fused import fuse
    from qtool.lowbit.runtime import dequantized
    from qtool.timing import interleaved_ms, medians

    repeats = max(repeats, 20)
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        fused = fuse(model, weights=weights)
        fp32 = dequantized(model, float_weights=True)
        rows = []
        for batch in batches:
            x = torch.randn(batch, in_channels, image_size, image_size, generator=torch.Generator().manual_seed(batch))
            expected, out = model(x), fused(x)
            measured = []
            for _ in range(max(rounds, 1)):
                times = medians(interleaved_ms({"fused": lambda: fused(x), "fp32": lambda: fp32(x)}, repeats, warmup))
                measured.append({"fused_ms": round(times["fused"], 4), "fp32_ms": round(times["fp32"], 4),
                                 "speedup_vs_fp32": round(times["fp32"] / times["fused"], 3)})
            middle = sorted(measured, key=lambda r: r["speedup_vs_fp32"])[len(measured) // 2]
            # timed on its own: interleaved, its float convs (new weight tensors every call)
            # disturbed fp32's timings (medians 1.7 -> up to 5.8 ms at batch 1)
            fake_quant = medians(interleaved_ms({"fake_quant": lambda: model(x)}, max(3, repeats // 5), 1))
            rows.append({
                "batch": batch, "threads": 1, "repeats": repeats, **middle,
                "fake_quant_ms": round(fake_quant["fake_quant"], 4),
                "rounds": measured,
                "logits_equal": bool(torch.equal(out, expected)),
                "max_abs_diff": float((out - expected).abs().max()),
            })
    finally:
        torch.set_num_threads(previous)
    load = os.getloadavg() if hasattr(os, "getloadavg") else None
    return {"model": type(model).__name__, "backend": ops.backend(), "isa": ops.isa(), "weights": weights,
            "load_average_after": None if load is None else [round(v, 2) for v in load],
            "cpu_count": os.cpu_count(),
            "supported_isas": ops.supported_isas(), "torch": torch.__version__, "cpu": cpu_identity(),
            "fused": fused.fused, "kept": fused.kept, "results": rows}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", help="a qtool checkpoint (default: a seeded resnet20, calibrated here)")
    parser.add_argument("--bits", type=int, default=4, help="weight and activation bits of the middle layers")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 32])
    parser.add_argument("--repeats", type=int, default=30, help="timed runs per side and round (at least 20)")
    parser.add_argument("--rounds", type=int, default=3, help="separate interleaved measurements per batch size")
    parser.add_argument("--weights", default="auto", choices=["auto", "lanes", "packed"],
                        help="fuse()'s weight layout: int8 lanes panels or packed int4/int3 (the library's tiles)")
    parser.add_argument("--isa", help="force the kernels' ISA (avx512, avx2, scalar); default: the best")
    parser.add_argument("--json", dest="json_path", default=str(DEFAULT_JSON), help="where to write the result")
    args = parser.parse_args(argv)

    from qtool.lowbit import ops

    if args.isa:
        ops.set_isa(args.isa)
    model = load_checkpoint(args.checkpoint, args.bits) if args.checkpoint else calibrated_resnet20(args.bits)
    result = bench_fused(model, args.batches, args.repeats, rounds=args.rounds, weights=args.weights)
    env = {k: os.environ[k] for k in ENV_KEYS if k in os.environ}
    result["command"] = " ".join([*(f"{k}={v}" for k, v in env.items()), "python", "benchmarks/fused_bench.py",
                                  *(argv if argv is not None else sys.argv[1:])])
    result["torch_cpu_capability"] = torch.backends.cpu.get_cpu_capability()
    result["source"] = args.checkpoint or f"resnet20, seed 0, W{args.bits}A{args.bits}, calibrated on one N(0, 1) batch"
    text = json.dumps(result, indent=2)
    print(text)
    if args.json_path:
        Path(args.json_path).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json_path).write_text(text + "\n")


if __name__ == "__main__":
    main()
