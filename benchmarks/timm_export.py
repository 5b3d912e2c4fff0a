"""Architectures users bring (timm), through qtool's whole path: prepare -> QAT -> export ->
verify against PyTorch on a held-out domain. Prints a pass/fail table.

timm needs torchvision, so this runs in its own virtual environment (timm stays out of the test
suite's dependencies; about 5.5 GB, most of it the CUDA build of torch 2.14.1):

    python3 -m venv ../venv-timm && . ../venv-timm/bin/activate
    pip install torch==2.14.1 torchvision==0.29.1 timm && pip install -e ".[train]"
    python benchmarks/timm_export.py --json docs/results/timm-export.json

Every model: random init, ``--fp-steps`` Adam steps in full precision on the source domains,
``qtool.prepare(model, bits, act_bits)``, ``--qat-steps`` QAT steps, ``qtool.export(...,
verify=...)`` on ``--verify`` images of the held-out domain (default options throughout).
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
import traceback
from pathlib import Path

import torch
import torch.nn.functional as F

import qtool
from qtool.data import load_domains, normalize, split_domains

MODELS = ("resnet18", "efficientnet_lite0", "regnetx_002", "mobilenetv4_conv_small", "resnet10t",
          "mobilenetv3_small_100", "mnasnet_small", "ghostnet_100")


def steps(model, images, labels, count: int, lr: float, batch: int = 64) -> None:
    generator = torch.Generator().manual_seed(0)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    model.train()
    for _ in range(count):
        index = torch.randint(0, len(labels), (batch,), generator=generator)
        loss = F.cross_entropy(model(images[index]), labels[index])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()


def main(argv=None) -> None:
    import timm

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", default="../shared/data/digits_dg.npz")
    parser.add_argument("--target-domain", default="mnist_m")
    parser.add_argument("--models", nargs="+", default=list(MODELS))
    parser.add_argument("--bits", type=int, default=4)
    parser.add_argument("--act-bits", type=int, default=4)
    parser.add_argument("--fp-steps", type=int, default=60)
    parser.add_argument("--qat-steps", type=int, default=30)
    parser.add_argument("--verify", type=int, default=1000)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    split = split_domains(load_domains(args.data, 32), args.target_domain, 0.2, 0)
    sources = torch.cat([d.images for d in split.train.values()])
    source_labels = torch.cat([d.labels for d in split.train.values()])
    images, labels = normalize(sources), source_labels.long()
    held_out = normalize(split.target.images[:args.verify])
    held_labels = split.target.labels[:args.verify].long()

    rows = {}
    for name in args.models:
        started = time.time()
        row = {"model": name, "timm": timm.__version__}
        try:
            torch.manual_seed(0)
            model = timm.create_model(name, pretrained=False, num_classes=10)
            steps(model, images, labels, args.fp_steps, lr=1e-3)
            quantized = qtool.prepare(model, bits=args.bits, act_bits=args.act_bits)
            row["placement"] = "graph" if isinstance(quantized, torch.fx.GraphModule) else "layers"
            steps(quantized, images, labels, args.qat_steps, lr=2e-4)
            with tempfile.TemporaryDirectory() as folder:
                result = qtool.export(quantized, held_out[:1], Path(folder) / "m.onnx", calibration=images[:256],
                                      verify=held_out, labels=held_labels)
            check = result.verification
            row.update(passed=True, agreement=check.agreement, within_step=check.within_step,
                       torch_accuracy=check.torch_accuracy, onnx_accuracy=check.onnx_accuracy,
                       integer_ops={k: v for k, v in result.ops.items() if k.startswith(("QLinear", "QGemm", "ConvInteger", "MatMulInteger"))},
                       float_islands={k: v for k, v in result.ops.items() if k in ("Conv", "Gemm", "FusedConv", "Sigmoid", "HardSigmoid", "HardSwish", "InstanceNormalization")},
                       notes=result.notes)
        except Exception as exc:  # a failure is a row of the table, not the end of the run
            row.update(passed=False, error=f"{type(exc).__name__}: {str(exc).splitlines()[0][:300]}",
                       where=traceback.format_exc().strip().splitlines()[-3:])
        row["seconds"] = round(time.time() - started, 1)
        rows[name] = row
        status = "PASS" if row["passed"] else "FAIL"
        detail = (f"agreement {100 * row['agreement']:.1f}%, within one step {100 * row['within_step']:.1f}%"
                  if row["passed"] else row["error"])
        print(f"| {name} | {status} | {detail} |", flush=True)
        if args.json:
            Path(args.json).parent.mkdir(parents=True, exist_ok=True)
            Path(args.json).write_text(json.dumps({"settings": vars(args), "models": rows}, indent=2, default=str))


if __name__ == "__main__":
    main()
