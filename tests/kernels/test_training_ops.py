"""The training ops in the one library (LSQ fake quantization, the ReSTE/STE sign): opcheck with
gradients, the compiled kernels against the reference, torch.compile, the reference backend."""

from __future__ import annotations

import pytest
import torch

from qtool.quant import fake_quant, sign_estimator

from test_fallback import run_child

LAYOUTS = {"contiguous": torch.contiguous_format, "channels_last": torch.channels_last}


def activations(layout: str, dtype=torch.float32) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, 3, 5, 5, generator=g, dtype=dtype) * 2
    x[0, 0, 0, :3] = torch.tensor([0.0, 0.1, 1.5])  # sign(0), ReSTE's m and t
    return x.contiguous(memory_format=LAYOUTS[layout])


def lsq_args(layout, dtype, per_channel, requires_grad=True):
    x = activations(layout, dtype).requires_grad_(requires_grad)
    scale = torch.linspace(0.05, 0.3, 4 if per_channel else 1, dtype=dtype).requires_grad_(requires_grad)
    return x, scale, -7.0, 7.0, 0.01


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("per_channel", [False, True])
def test_opcheck_lsq_with_gradients(qops, layout, dtype, per_channel):
    torch.library.opcheck(torch.ops.qtool.lsq_fake_quant.default, lsq_args(layout, dtype, per_channel))


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("o,t", [(1.0, 1.0), (3.0, 1.5)])
def test_opcheck_sign_estimator_with_gradients(qops, layout, dtype, o, t):
    z = activations(layout, dtype).requires_grad_()
    torch.library.opcheck(torch.ops.qtool.reste_sign.default, (z, o, t, 0.1))


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_lsq_kernel_equals_the_reference(qops, layout, dtype):
    x, scale, qmin, qmax, factor = lsq_args(layout, dtype, per_channel=True)
    y = fake_quant.lsq_fake_quant(x, scale, qmin, qmax, factor)
    grad = torch.randn_like(y)
    y.backward(grad)
    detached = (x.detach(), scale.detach(), qmin, qmax, factor)
    grad_x, grad_scale = fake_quant.reference_backward(grad, *detached)
    assert torch.equal(y, fake_quant.reference_forward(*detached))
    assert torch.equal(x.grad, grad_x)
    torch.testing.assert_close(scale.grad, grad_scale, rtol=1e-5, atol=1e-7)  # sums in another order
    assert y.stride() == x.stride() and x.grad.stride() == x.stride()


def test_a_strided_input_is_quantized_like_its_contiguous_copy(qops):
    x, scale, *grid = lsq_args("contiguous", torch.float32, per_channel=False, requires_grad=False)
    strided = x.transpose(1, 3)
    out = fake_quant.lsq_fake_quant(strided, scale, *grid)
    assert torch.equal(out, fake_quant.reference_forward(strided, scale, *grid)) and out.is_contiguous()


@pytest.mark.parametrize("o,t", [(1.0, 1.0), (1.0, 1.5), (1.7, 1.5), (3.0, 1.5), (3.0, 0.9)])
def test_sign_kernel_equals_the_reference(qops, o, t):
    z = activations("channels_last").requires_grad_()
    out = sign_estimator.sign_with_estimator(z, o, t, 0.1)
    grad = torch.randn(z.shape)  # contiguous: the kernel must match z's layout itself
    out.backward(grad)
    assert torch.equal(out, sign_estimator.binary_sign(z.detach()))
    torch.testing.assert_close(z.grad, grad * sign_estimator.reste_gradient(z.detach(), o, t, 0.1),
                               rtol=1e-5, atol=1e-6)  # libmvec's exp/log against torch.pow


def test_torch_compile_traces_forward_and_backward(qops):
    def step(x, scale):
        y = fake_quant.lsq_fake_quant(x, scale, -7, 7, 0.01)
        return sign_estimator.sign_with_estimator(y, 3.0, 1.5, 0.1).sum() + y.square().sum()

    compiled = torch.compile(step, backend="aot_eager", fullgraph=True)
    grads = []
    for fn in (step, compiled):
        x, scale, *_ = lsq_args("contiguous", torch.float32, per_channel=True)
        fn(x, scale).backward()
        grads.append((x.grad, scale.grad))
    for eager, traced in zip(*grads):
        assert torch.equal(eager, traced)


CHILD_TRAINING = """
import sys, torch
from qtool.native import library
from qtool.quant import fake_quant, sign_estimator
from test_training_ops import lsq_args
x, scale, *grid = lsq_args("channels_last", torch.float32, per_channel=True)
y = fake_quant.lsq_fake_quant(x, scale, *grid)
sign_estimator.sign_with_estimator(y, 3.0, 1.5, 0.1).sum().backward()
torch.save({"backend": library.load(), "outputs": (y.detach(), x.grad, scale.grad)}, sys.argv[1])
"""


def test_the_reference_backend_trains_with_the_same_numbers(qops, tmp_path):
    child, stderr = run_child(tmp_path, CHILD_TRAINING, QTOOL_KERNELS="reference")
    assert child["backend"] == "reference" and "qtool:" not in stderr
    x, scale, *grid = lsq_args("channels_last", torch.float32, per_channel=True)
    y = fake_quant.lsq_fake_quant(x, scale, *grid)
    sign_estimator.sign_with_estimator(y, 3.0, 1.5, 0.1).sum().backward()
    y_ref, grad_x_ref, grad_scale_ref = child["outputs"]
    assert torch.equal(y.detach(), y_ref)
    # ReSTE's power (libmvec's exp/log against torch.pow) and LSQ's step-size sums: a few ulps.
    torch.testing.assert_close(x.grad, grad_x_ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(scale.grad, grad_scale_ref, rtol=1e-5, atol=1e-6)


def test_the_old_switch_still_forces_the_reference_with_one_line(qops, tmp_path):
    child, stderr = run_child(tmp_path, QTOOL_NO_EXTENSIONS="1")
    notices = [line for line in stderr.splitlines() if line.startswith("qtool:")]
    assert child["backend"] == "reference"
    assert len(notices) == 1 and "QTOOL_NO_EXTENSIONS=1 is deprecated; set QTOOL_KERNELS=reference" in notices[0]
