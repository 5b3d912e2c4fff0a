"""qtool's ONNX export against the peers a user would pick, side by side in one run.

For each qtool checkpoint (``qtool quantize ...``) this writes, into ``--out``:

- ``<model>-qtool.onnx``            qtool export, default options (int8 weight storage)
- ``<model>-qtool-int4.onnx``       the same with INT4 weight storage
- ``<model>-qtool-fast.onnx``       (layer-swapped checkpoints only) fast numerics
- ``<model>-fp32.onnx``             the same network in float (torch.onnx.export, TorchScript path)
- ``<model>-ort-int8.onnx``         onnxruntime's quantize_static of that fp32 file (QDQ, per-channel,
                                    uint8 activations, int8 weights, MinMax on the same calibration images)
- ``<model>-brevitas.onnx``         (layer-swapped checkpoints only) Brevitas export_onnx_qcdq of the
                                    equivalent Brevitas model

then times them all with ``qtool.bench`` (interleaved runs, batch 1) and checks onnxruntime
against PyTorch on the held-out domain. ``--image-size`` resizes the images (the zoo models are
fully convolutional): latency at edge-camera resolutions.

    python benchmarks/export_bench.py --checkpoint resnet20-w4a4=runs/export-zoo/resnet20-w4a4/model.pt \
        --data ../shared/data/digits_dg.npz --out runs/export-bench --threads 1
"""

from __future__ import annotations

import argparse
import copy
import json
from pathlib import Path

import torch
from torch import nn

from qtool.bench import BenchConfig, bench_models
from qtool.checkpoint import load_model
from qtool.data import load_domains, normalize, split_domains
from qtool.exporters.export import export
from qtool.exporters.verify import compare
from qtool.lowbit.runtime import dequantized
from qtool.models import build_model
from qtool.quant.layers import QuantizedLayer


def float_twin(model: nn.Module, payload: dict) -> nn.Module:
    """The same architecture and weights without quantizers: the fp32 model of this network."""
    if isinstance(model, torch.fx.GraphModule):  # graph-prepared: its layers hold the float weights
        return dequantized(model, float_weights=True)
    twin = build_model(payload["arch"], payload["num_classes"], payload["in_channels"])
    state = {k: v for k, v in model.state_dict().items() if "_quantizer." not in k}
    twin.load_state_dict(state)
    return twin.eval()


def brevitas_twin(model: nn.Module, fp32: nn.Module, calibration: torch.Tensor) -> nn.Module:
    """Each qtool-quantized layer becomes a Brevitas QuantConv2d/QuantLinear with the same weight
    bits (per-channel scales) and an input quantizer with the same activation bits and sign;
    activation scales come from Brevitas' own calibration on the same images."""
    import brevitas.nn as qnn
    from brevitas.graph.calibrate import calibration_mode
    from brevitas.quant import Int8ActPerTensorFloat, Int8WeightPerChannelFloat, Uint8ActPerTensorFloat

    twin = copy.deepcopy(fp32)
    for name, layer in model.named_modules():
        if not isinstance(layer, QuantizedLayer):
            continue
        act = Int8ActPerTensorFloat if layer.input_quantizer.signed else Uint8ActPerTensorFloat
        common = dict(weight_quant=Int8WeightPerChannelFloat, weight_bit_width=layer.bits, input_quant=act,
                      input_bit_width=layer.act_bits, bias=layer.bias is not None)
        if isinstance(layer, nn.Conv2d):
            quant = qnn.QuantConv2d(layer.in_channels, layer.out_channels, layer.kernel_size, stride=layer.stride,
                                    padding=layer.padding, dilation=layer.dilation, groups=layer.groups, **common)
        else:
            quant = qnn.QuantLinear(layer.in_features, layer.out_features, **common)
        quant.load_state_dict({k: v for k, v in layer.state_dict().items() if "_quantizer." not in k}, strict=False)
        parent, _, child = name.rpartition(".")
        setattr(twin.get_submodule(parent) if parent else twin, child, quant)
    twin.eval()
    with torch.no_grad(), calibration_mode(twin):
        for start in range(0, len(calibration), 128):
            twin(calibration[start:start + 128])
    return twin.eval()


def ort_quantize_static(fp32_path: Path, out: Path, calibration: torch.Tensor) -> None:
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.batches = iter([{"input": calibration[i:i + 1].numpy()} for i in range(len(calibration))])

        def get_next(self):
            return next(self.batches, None)

    prepared = out.with_suffix(".pre.onnx")
    quant_pre_process(str(fp32_path), str(prepared))
    quantize_static(str(prepared), str(out), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                    activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8)
    prepared.unlink()


def export_float(model: nn.Module, example: torch.Tensor, path: Path) -> None:
    torch.onnx.export(model, example, str(path), dynamo=False, opset_version=17, input_names=["input"],
                      output_names=["logits"], dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}})


def brevitas_export(model: nn.Module, example: torch.Tensor, path: Path) -> None:
    from brevitas.export import export_onnx_qcdq

    export_onnx_qcdq(model, args=example, export_path=str(path), dynamo=False, opset_version=17,
                     input_names=["input"], output_names=["logits"])


def run(args) -> dict:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results = {"models": {}, "settings": vars(args)}
    for spec in args.checkpoint:
        name, _, checkpoint = spec.partition("=")
        model, payload = load_model(checkpoint)
        trained = payload["meta"]["options"]
        data = load_domains(args.data, payload["image_size"])
        split = split_domains(data, trained["target_domain"], trained["holdout"], trained["seed"])
        generator = torch.Generator().manual_seed(0)
        sources = torch.cat([d.images for d in split.train.values()])
        calibration = resized(normalize(sources[torch.randperm(len(sources), generator=generator)[:args.calibration]]),
                              args.image_size)
        target = split.target
        index = torch.randperm(len(target.labels), generator=generator)[:args.verify]
        held_out, labels = resized(normalize(target.images[index]), args.image_size), target.labels[index]
        example = calibration[:1]

        layer_swapped = not isinstance(model, torch.fx.GraphModule)
        variants = {"qtool": {}, "qtool-int4": dict(weight_storage="int4")}
        if layer_swapped:
            variants["qtool-fast"] = dict(numerics="fast")
        files = {}
        for variant, kwargs in variants.items():
            path = out / f"{name}-{variant}.onnx"
            export(model, example, path, calibration=calibration, **kwargs)
            files[variant] = path
        fp32 = float_twin(model, payload)
        files["fp32"] = out / f"{name}-fp32.onnx"
        export_float(fp32, example, files["fp32"])
        files["ort-int8"] = out / f"{name}-ort-int8.onnx"
        ort_quantize_static(files["fp32"], files["ort-int8"], calibration[:args.ort_calibration])
        if layer_swapped:
            files["brevitas"] = out / f"{name}-brevitas.onnx"
            brevitas_export(brevitas_twin(model, fp32, calibration), example, files["brevitas"])

        verification = {}
        for variant in variants:
            check = compare(model, str(files[variant]), held_out, labels, threads=args.threads[-1])
            verification[variant] = {**check.to_dict(), "summary": check.summary(), "domain": target.name}
            print(f"{name} {variant}: {check.summary()}", flush=True)

        order = [*variants, "ort-int8", "fp32", *(["brevitas"] if layer_swapped else [])]
        timings = {}
        for threads in args.threads:
            result = bench_models([str(files[v]) for v in order], BenchConfig(threads=threads, runs=args.runs,
                                                                             warmup=args.warmup, batch=1))
            timings[threads] = {v: m for v, m in zip(order, result["models"])}
        results["models"][name] = {"verification": verification, "bench": timings, "image_size": args.image_size,
                                   "accuracy": payload["meta"].get("report", {}).get("accuracy")}
    return results


def resized(images: torch.Tensor, size: int | None) -> torch.Tensor:
    if size is None or size == images.shape[-1]:
        return images
    return torch.nn.functional.interpolate(images, size=(size, size), mode="bilinear", align_corners=False)


def markdown(results: dict) -> str:
    lines = []
    for name, result in results["models"].items():
        for threads, models in result["bench"].items():
            ort, fp32 = (models[k]["latency_ms"]["median"] for k in ("ort-int8", "fp32"))
            brev = models["brevitas"]["latency_ms"]["median"] if "brevitas" in models else float("nan")
            lines += [f"\n**{name}, {result['image_size'] or 'native'} px, {threads} thread(s)**\n",
                      "| model | KiB | median ms | p90 ms | × ORT int8 latency | × fp32 latency | × Brevitas latency "
                      "| × ORT int8 size | × fp32 size | integer kernels | float compute |",
                      "|---|---:|---:|---:|---:|---:|---:|---:|---:|---|---|"]
            for variant, model in models.items():
                median = model["latency_ms"]["median"]
                integer = ", ".join(f"{op}×{n}" for op, n in sorted(model["ops"].items()) if op.startswith(("QLinear", "QGemm", "ConvInteger", "MatMulInteger")))
                floating = ", ".join(f"{op}×{n}" for op, n in sorted(model["ops"].items()) if op in ("Conv", "FusedConv", "Gemm", "MatMul", "FusedGemm"))
                lines.append(f"| {variant} | {model['bytes'] / 1024:.1f} | {median:.3f} | {model['latency_ms']['p90']:.3f} | "
                             f"{median / ort:.2f} | {median / fp32:.2f} | {median / brev:.2f} | "
                             f"{model['bytes'] / models['ort-int8']['bytes']:.3f} | "
                             f"{model['bytes'] / models['fp32']['bytes']:.3f} | {integer or '-'} | {floating or '-'} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", action="append", required=True, help="NAME=PATH of a qtool checkpoint")
    parser.add_argument("--image-size", type=int, default=None, help="resize the images (default: as trained)")
    parser.add_argument("--data", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--verify", type=int, default=1000)
    parser.add_argument("--calibration", type=int, default=512)
    parser.add_argument("--ort-calibration", type=int, default=128, help="images for quantize_static's MinMax pass")
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--runs", type=int, default=300)
    parser.add_argument("--warmup", type=int, default=30)
    args = parser.parse_args()
    torch.set_num_threads(max(args.threads))
    results = run(args)
    (Path(args.out) / "results.json").write_text(json.dumps(results, indent=2, default=str))
    table = markdown(results)
    (Path(args.out) / "results.md").write_text(table)
    print(table)


if __name__ == "__main__":
    main()
