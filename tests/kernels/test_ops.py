"""Operator registration: schemas, fake implementations (opcheck), torch.compile, dispatch."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from qtool.lowbit import fused_reference as fused_ref
from qtool.lowbit import reference as ref
from qtool.native import library


def sample_calls():
    g = torch.Generator().manual_seed(0)
    codes4 = torch.randint(-8, 8, (5, 100), generator=g)
    codes3 = torch.randint(-4, 4, (5, 100), generator=g)
    w4, w3 = ref.pack_int4(codes4), ref.pack_int3(codes3)
    x = torch.randn(3, 100, generator=g)
    xq, xs = ref.quantize_rows_i8(x)
    bits_a, bits_w = ref.pack_binary(torch.randn(4, 70, generator=g)), ref.pack_binary(torch.randn(6, 70, generator=g))
    conv_w = ref.pack_binary(torch.randn(8, 3 * 3 * 5, generator=g))
    activations = (torch.randn(4, 3, 5, 5, generator=g) * 2).contiguous(memory_format=torch.channels_last)
    step, grad = torch.rand(4, generator=g) * 0.2 + 0.05, torch.randn(4, 3, 5, 5, generator=g)
    codes_x = torch.randint(0, 16, (2, 5, 6, 7), generator=g).to(torch.uint8)
    lanes = fused_ref.lanes_weights(torch.randint(-7, 8, (6, 45), generator=g))
    bias, unit = torch.randint(-99, 99, (6,), generator=g, dtype=torch.int32), torch.rand(6, generator=g) * 0.01
    epilogue = ([0.0, float("inf")], 0.05, [0, 15])
    return {
        "pack_int4": (codes4,),
        "unpack_int4": (w4, 100),
        "pack_int3": (codes3,),
        "unpack_int3": (w3, 100),
        "pack_binary": (x,),
        "unpack_binary": (bits_a, 70),
        "quantize_rows_i8": (x,),
        "lowbit_gemm": (x, w4, torch.rand(5, 2, generator=g), 4, 100, 64),
        "lowbit_gemm_i8": (xq, xs, w3, torch.rand(5, 1, generator=g), 3, 100, 100),
        "binary_gemm": (bits_a, bits_w, 70, torch.rand(6, generator=g)),
        "binary_conv2d": (torch.randn(2, 5, 6, 7, generator=g), conv_w, 5, [3, 3], [2, 1], [1, 1], [1, 1],
                          torch.rand(8, generator=g)),
        "binary_conv2d_fused": (torch.randn(2, 5, 6, 7, generator=g), conv_w, 5, [3, 3], [2, 1], [1, 1], [1, 1],
                                torch.rand(8, generator=g), torch.randn(8, generator=g), True,
                                torch.rand(8, generator=g), torch.randn(8, generator=g),
                                torch.randn(2, 8, 3, 7, generator=g), True),
        "fused_conv2d": (codes_x, lanes, bias, unit, unit / 0.05, 8, [3, 3], [2, 1], [1, 1], [1, 1], *epilogue,
                         torch.randint(-8, 8, (2, 6, 3, 7), generator=g).to(torch.int8), 0.1, [0.0, float("inf")],
                         0.07, [0, 15]),
        "fused_linear": (xq, w4, torch.randint(-99, 99, (5,), generator=g, dtype=torch.int32),
                         torch.rand(5, generator=g) * 0.01, None, 4, *epilogue, None, 0.0, [0.0, 0.0], 0.0, [0, 0]),
        "lsq_fake_quant": (activations, step, -7.0, 7.0, 0.01),
        "lsq_fake_quant_backward": (grad, activations, step, -7.0, 7.0, 0.01),
        "reste_sign": (activations, 3.0, 1.5, 0.1),
        "reste_sign_backward": (grad, activations, 3.0, 1.5, 0.1),
    }


def compiled_op_names() -> set[str]:
    """The public operators of the loaded library (the ``_``-prefixed ISA controls aside)."""
    names = {n.split("::", 1)[1] for n in torch._C._dispatch_get_all_op_names() if n.startswith("qtool::")}
    return {n for n in names if not n.startswith("_")}


def test_python_schemas_match_the_compiled_ones(qops):
    for name, schema in library.SCHEMAS.items():
        assert str(getattr(torch.ops.qtool, name).default._schema) == f"qtool::{schema}"


def test_every_compiled_op_has_a_reference_a_schema_copy_and_a_sample(qops):
    assert compiled_op_names() == set(library.REFERENCE) == set(library.SCHEMAS) == set(sample_calls())


@pytest.mark.parametrize("name", sorted(sample_calls()))
def test_opcheck(qops, name):
    torch.library.opcheck(getattr(torch.ops.qtool, name).default, sample_calls()[name])


@pytest.mark.parametrize("name", sorted(sample_calls()))
def test_compiled_op_equals_reference(qops, name):
    args = sample_calls()[name]
    out, expected = getattr(torch.ops.qtool, name)(*args), library.REFERENCE[name](*args)
    for o, e in zip(out if isinstance(out, tuple) else (out,), expected if isinstance(expected, tuple) else (expected,)):
        torch.testing.assert_close(o, e, rtol=1e-5, atol=1e-5 * float(e.abs().max()))


def test_torch_compile_traces_through_the_ops(qops):
    w = ref.pack_binary(torch.randn(8, 45))
    w4 = ref.pack_int4(torch.randint(-8, 8, (4, 8 * 16 * 16)))

    def model(x):
        y = torch.ops.qtool.binary_conv2d(x, w, 5, [3, 3], [1, 1], [1, 1], [1, 1], None)
        y = torch.relu(y).flatten(1)
        q, s = torch.ops.qtool.quantize_rows_i8(y)
        return torch.ops.qtool.lowbit_gemm_i8(q, s, w4, torch.ones(4, 1), 4, y.shape[1], y.shape[1])

    x = torch.randn(2, 5, 16, 16)
    compiled = torch.compile(model, backend="eager", fullgraph=True)
    assert torch.equal(compiled(x), model(x))


def run_python(code: str, **env) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                          env={**os.environ, **env})


def test_environment_variable_forces_the_isa(qops):
    forced = qops.supported_isas()[-1]  # the most basic one this CPU runs
    result = run_python("from qtool.lowbit import ops; print(ops.isa())", QTOOL_KERNEL_ISA=forced)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == forced


def test_unknown_isa_falls_back_to_the_best_with_a_notice(qops):
    result = run_python("from qtool.lowbit import ops; print(ops.isa())", QTOOL_KERNEL_ISA="neon")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == qops.supported_isas()[0]
    assert "QTOOL_KERNEL_ISA=neon is not available" in result.stderr


def test_set_isa_rejects_unknown_names(qops):
    with pytest.raises(RuntimeError, match="not available"):
        qops.set_isa("neon")
    assert qops.isa() == qops.supported_isas()[0]
