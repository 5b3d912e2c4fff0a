"""QAT training step time against full precision, interleaved in one run: what the extra
graph-placed quantizers cost, next to the layer-swap placement and the same layers in Brevitas.

    python benchmarks/qat_steptime.py --threads 1 --batch 64 --json docs/results/qat-steptime.json

One step is forward, backward and Adam on a fixed batch (plain optimizer: the quantizers' cost,
not SAGM's second pass). Medians over ``--repeats`` interleaved rounds after two warm-up rounds.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
import torch.nn.functional as F

from qtool.models import build_model
from qtool.quant.prepare import prepare
from qtool.timing import interleaved_ms, medians


def brevitas_twin(model: torch.nn.Module, bits: int) -> torch.nn.Module:
    """Every Conv2d/Linear a Brevitas layer with learned-scale weight and input quantizers."""
    import copy

    import brevitas.nn as qnn
    from brevitas.quant import Int8ActPerTensorFloat, Int8WeightPerChannelFloat

    twin = copy.deepcopy(model)
    for name, layer in list(twin.named_modules()):
        common = dict(weight_quant=Int8WeightPerChannelFloat, weight_bit_width=bits, input_quant=Int8ActPerTensorFloat,
                      input_bit_width=bits, bias=layer.bias is not None) if isinstance(layer, (torch.nn.Conv2d, torch.nn.Linear)) else None
        if common is None:
            continue
        if isinstance(layer, torch.nn.Conv2d):
            quant = qnn.QuantConv2d(layer.in_channels, layer.out_channels, layer.kernel_size, stride=layer.stride,
                                    padding=layer.padding, groups=layer.groups, **common)
        else:
            quant = qnn.QuantLinear(layer.in_features, layer.out_features, **common)
        quant.load_state_dict(layer.state_dict(), strict=False)
        parent, _, child = name.rpartition(".")
        setattr(twin.get_submodule(parent) if parent else twin, child, quant)
    return twin


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="resnet20")
    parser.add_argument("--bits", type=int, default=4)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--no-brevitas", action="store_true")
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    fp = build_model(args.model)
    images, labels = torch.randn(args.batch, 3, 32, 32), torch.randint(0, 10, (args.batch,))
    models = {"fp32": fp, f"w{args.bits}a{args.bits}-graph": prepare(fp, args.bits, args.bits),
              f"w{args.bits}a{args.bits}-layers": prepare(fp, args.bits, args.bits, placement="layers")}
    if not args.no_brevitas:
        models[f"w{args.bits}a{args.bits}-brevitas"] = brevitas_twin(fp, args.bits)

    def stepper(model):
        model.train()
        model(images)  # initialises LSQ step sizes outside the timed steps
        optimizer = torch.optim.Adam(model.parameters(), lr=1e-4)

        def step():
            loss = F.cross_entropy(model(images), labels)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        return step

    times = interleaved_ms({name: stepper(model) for name, model in models.items()}, args.repeats, warmup=2)
    median = medians(times)
    result = {"model": args.model, "threads": args.threads, "batch": args.batch, "repeats": args.repeats,
              "median_ms": median, "ratio_vs_fp32": {name: value / median["fp32"] for name, value in median.items()},
              "torch": torch.__version__}
    print(json.dumps(result, indent=2))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
