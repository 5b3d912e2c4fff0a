"""Residual-add and squeeze-excitation kernels of onnxruntime on an emulated CPU against this
machine's and against qtool's model of that CPU's QLinearAdd (``qtool.quant.integer``)."""

from __future__ import annotations

import numpy as np
import torch

from qtool import emulated_cpu
from qtool.onnxrt import create_session


def joins_model(steps: np.ndarray, zeros: np.ndarray, n: int) -> bytes:
    """One QLinearAdd and one QLinearMul per trial on rows 2t, 2t+1 of a uint8 [2T, n] input, every
    result concatenated: all trials in one onnxruntime run."""
    from onnx import TensorProto, helper

    nodes, initializers, outputs = [], [], []
    for t in range(len(steps)):
        names = []
        for i in range(3):
            initializers += [helper.make_tensor(f"s{t}_{i}", TensorProto.FLOAT, [], [float(steps[t, i])]),
                             helper.make_tensor(f"z{t}_{i}", TensorProto.UINT8, [], [int(zeros[t, i])])]
            names.append((f"s{t}_{i}", f"z{t}_{i}"))
        for row in (0, 1):
            initializers.append(helper.make_tensor(f"row{t}_{row}", TensorProto.INT64, [], [2 * t + row]))
            nodes.append(helper.make_node("Gather", ["ab", f"row{t}_{row}"], [f"x{t}_{row}"], axis=0))
        for op in ("QLinearAdd", "QLinearMul"):
            inputs = [f"x{t}_0", *names[0], f"x{t}_1", *names[1], *names[2]]
            nodes.append(helper.make_node(op, inputs, [f"{op}{t}"], domain="com.microsoft"))
            outputs.append(f"{op}{t}")
    nodes.append(helper.make_node("Concat", outputs, ["codes"], axis=0))
    graph = helper.make_graph(nodes, "joins", [helper.make_tensor_value_info("ab", TensorProto.UINT8, [2 * len(steps), n])],
                              [helper.make_tensor_value_info("codes", TensorProto.UINT8, [2 * len(steps) * n])],
                              initializers)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)])
    return model.SerializeToString()


def join_trials(trials: int = 24, n: int = 16411, seed: int = 0):
    """Random steps (the range of one network's), zero points and uint8 operands; a length that
    leaves a tail after every SIMD block. As in test_graph_prepare's check against x86's kernels."""
    rng = np.random.default_rng(seed)
    steps = np.exp(rng.uniform(-5, 0, (trials, 3))).astype(np.float32)
    zeros = np.where(rng.integers(0, 2, (trials, 3)) == 1, 128, 0)
    return steps, zeros, rng.integers(0, 256, (2 * trials, n)).astype(np.uint8)


def check_join_codes(steps, zeros, inputs, cpu: str, add_codes) -> int:
    """Asserts that on ``cpu`` QLinearMul gives this machine's codes and QLinearAdd the codes
    ``add_codes(codes_a, codes_b, zeros, steps)`` computes; returns how many Add codes differ from
    this machine's."""
    trials, n = len(steps), inputs.shape[1]
    model = joins_model(steps, zeros, n)
    (here,) = create_session(model).run(None, {"ab": inputs})
    there = emulated_cpu.run(model, inputs, cpu)
    here, there = here.reshape(trials, 2, n), there.reshape(trials, 2, n)
    assert np.array_equal(there[:, 1], here[:, 1])
    for t in range(trials):
        a, b = (torch.from_numpy(inputs[2 * t + i].astype(np.float32)) for i in (0, 1))
        codes = add_codes(a, b, [int(v) for v in zeros[t]], [torch.tensor(float(v)) for v in steps[t]])
        assert np.array_equal(codes.numpy(), there[t, 0]), t
    return int((there[:, 0] != here[:, 0]).sum())
