"""SAM, GSAM and SAGM: one step on a tiny quadratic against the update computed by hand.

Loss L(w) = 0.5 * ||A w - b||^2, gradient A^T (A w - b). Base optimizer: SGD, lr 0.1, so the
new weights are w - 0.1 * d with d the method's direction.
"""

import numpy as np
import pytest
import torch

from qtool.train.optim import GSAM, SAGM, SAM, PlainStep, build_optimizer

A = np.array([[2.0, 0.5], [0.0, 1.0], [1.0, -1.0]])
B = np.array([1.0, -2.0, 0.5])
W0 = np.array([0.3, -0.4])
LR, RHO = 0.1, 0.05


def grad(w):
    return A.T @ (A @ w - B)


def run_step(optimizer_class, **kwargs):
    w = torch.nn.Parameter(torch.tensor(W0, dtype=torch.float64))
    optimizer = optimizer_class(torch.optim.SGD([w], lr=LR), **kwargs)
    a, b = torch.tensor(A), torch.tensor(B)

    def loss_fn(perturbed):
        residual = a @ w - b
        return 0.5 * (residual ** 2).sum(), residual

    optimizer.step(loss_fn)
    return w.detach().numpy()


def test_plain_step_is_gradient_descent():
    assert np.allclose(run_step(PlainStep), W0 - LR * grad(W0))


def test_sam():
    g = grad(W0)
    g_p = grad(W0 + RHO * g / np.linalg.norm(g))
    assert np.allclose(run_step(SAM, rho=RHO), W0 - LR * g_p)


def test_gsam():
    alpha = 0.3
    g = grad(W0)
    g_p = grad(W0 + RHO * g / np.linalg.norm(g))
    parallel = (g @ g_p) / (g_p @ g_p) * g_p
    direction = g_p - alpha * (g - parallel)
    assert np.allclose(run_step(GSAM, rho=RHO, alpha=alpha), W0 - LR * direction)


def test_sagm():
    alpha = 0.02
    g = grad(W0)
    g_p = grad(W0 + (RHO / np.linalg.norm(g) - alpha) * g)
    assert np.allclose(run_step(SAGM, rho=RHO, alpha=alpha), W0 - LR * 0.5 * (g + g_p))


def test_hooks_see_both_gradients_and_can_edit_the_direction():
    seen = {}

    def hook(grads):
        seen["grad"] = grads.grad[0].numpy().copy()
        seen["perturbed"] = grads.perturbed_grad[0].numpy().copy()
        grads.direction[0].zero_()  # freeze everything: the weights must not move

    w = torch.nn.Parameter(torch.tensor(W0, dtype=torch.float64))
    optimizer = SAGM(torch.optim.SGD([w], lr=LR), rho=RHO, alpha=0.0)
    optimizer.hooks.append(hook)
    a, b = torch.tensor(A), torch.tensor(B)
    optimizer.step(lambda perturbed: (0.5 * ((a @ w - b) ** 2).sum(), a @ w))
    g = grad(W0)
    assert np.allclose(seen["grad"], g)
    assert np.allclose(seen["perturbed"], grad(W0 + RHO * g / np.linalg.norm(g)))
    assert np.array_equal(w.detach().numpy(), W0)


@pytest.mark.parametrize("method", ["lsq", "ste", "reste"])
def test_plain_step_calls_its_hooks(method):
    from qtool.train.methods import get_method

    seen = {}

    def hook(grads):
        seen["grad"] = grads.grad[0].numpy().copy()
        seen["perturbed"] = grads.perturbed_grad[0].numpy().copy()
        grads.direction[0].zero_()  # freeze everything: the weights must not move

    w = torch.nn.Parameter(torch.tensor(W0, dtype=torch.float64))
    unused = torch.nn.Parameter(torch.zeros(1, dtype=torch.float64))  # no gradient: left to the base optimizer
    optimizer = build_optimizer(get_method(method).optimizer, torch.optim.SGD([w, unused], lr=LR))
    optimizer.hooks.append(hook)
    a, b = torch.tensor(A), torch.tensor(B)
    optimizer.step(lambda perturbed: (0.5 * ((a @ w - b) ** 2).sum(), a @ w))
    assert np.allclose(seen["grad"], grad(W0)) and np.allclose(seen["perturbed"], grad(W0))  # e = 0
    assert np.array_equal(w.detach().numpy(), W0)
    assert unused.grad is None


def test_perturbation_is_undone_exactly():
    """After the step the weights are w - lr * d, not (w + e - e) - lr * d with rounding error."""
    w = torch.nn.Parameter(torch.tensor([1e8, 1e-8], dtype=torch.float32))
    optimizer = SAM(torch.optim.SGD([w], lr=0.0), rho=1.0)
    optimizer.step(lambda perturbed: ((w * torch.tensor([1e-8, 1.0])).sum(), w))
    assert w.detach().tolist() == torch.tensor([1e8, 1e-8]).tolist()


def test_unknown_optimizer_and_negative_rho():
    base = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
    with pytest.raises(ValueError, match="unknown optimizer"):
        build_optimizer("adamw-sam", base)
    with pytest.raises(ValueError, match="rho"):
        SAM(base, rho=-1)
