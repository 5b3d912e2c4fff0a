"""``qtool bench --kernels`` and ``qtool bench CKPT.pt --backend kernels``: trained qtool models
(4-bit LSQ and binary) run on the low-bit kernels with the outputs of the trained model."""

from __future__ import annotations

import json

import pytest
import torch

from qtool.checkpoint import save_checkpoint
from qtool.lowbit import ops
from qtool.models import build_model
from qtool.quant.binarize import prepare_binary
from qtool.quant.prepare import prepare

needs_kernels = pytest.mark.skipif(ops.backend() != "extension", reason="the kernel extension did not build here")


def checkpoint(tmp_path, bits: int) -> str:
    torch.manual_seed(0)
    model = build_model("resnet20", 10, 3)
    model = prepare_binary(model) if bits == 1 else prepare(model, bits, bits)
    model.train()(torch.randn(16, 3, 32, 32))  # first batch: LSQ step sizes and BN statistics
    path = tmp_path / f"w{bits}.pt"
    save_checkpoint(path, model.eval(), "resnet20", 10, 3, 32, meta={})
    return str(path)


@needs_kernels
# graph-prepared 4-bit models run as fused integer layers (qtool.lowbit.fused), binary ones layer by layer
@pytest.mark.parametrize("bits, kernel, exact", [(4, "int8 lanes conv", True), (1, "binary", False)])
def test_checkpoint_runs_on_the_kernels_like_the_trained_model(tmp_path, run_cli, bits, kernel, exact):
    code, out, err = run_cli("bench", checkpoint(tmp_path, bits), "--backend", "kernels", "--runs", "2",
                             "--batch", "2", "--json", tmp_path / "bench.json")
    assert code == 0, err
    result = json.loads((tmp_path / "bench.json").read_text())
    assert any(kernel in how for how in result["converted"].values()) and result["input_shape"] == [2, 3, 32, 32]
    # 4-bit layers sum integer codes exactly (the float steps and bias are applied in another order
    # than PyTorch's: rounding-level drift); binary layers differ from the float conv by rounding only
    assert result["max_abs_diff"] < (1e-4 if exact else 1e-3)
    assert result["top1_agreement"] == 1.0
    row = result["results"][0]
    assert row["threads"] == 1 and row["speedup"] == pytest.approx(row["fp32_ms"] / row["kernels_ms"])
    assert "speedup vs fp32" in out


@pytest.mark.parametrize("args, message", [
    (["--kernels", "model.onnx"], "takes no MODEL"),
    (["--backend", "kernels"], "one qtool checkpoint"),
    (["missing.pt", "--backend", "kernels"], "checkpoint not found"),
])
def test_kernel_bench_mistakes_are_one_line_errors(run_cli, args, message):
    code, out, err = run_cli("bench", *args)
    assert code == 2 and err.startswith("error: ") and message in err and len(err.strip().splitlines()) == 1
