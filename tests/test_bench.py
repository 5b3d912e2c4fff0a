"""``qtool bench``: the contract's JSON, the census of what onnxruntime ran, one-line errors, and
the torch-free path an edge device runs."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from qtool.bench import BenchConfig, bench_models
from qtool.onnxrt import op_census

REPO = Path(__file__).resolve().parents[1]


def conv_model(path: Path, quantized: bool) -> Path:
    """A 3x3 conv on a 1x8x16x16 input: float, or in the QDQ form onnxruntime fuses to QLinearConv."""
    rng = np.random.default_rng(0)
    codes = rng.integers(-7, 8, size=(8, 8, 3, 3)).astype(np.int8)
    inits = [numpy_helper.from_array(np.array(0.05, np.float32), "s"), numpy_helper.from_array(np.array(0, np.uint8), "z")]
    if quantized:
        inits += [numpy_helper.from_array(codes, "w"), numpy_helper.from_array(np.full(8, 0.01, np.float32), "ws"),
                  numpy_helper.from_array(np.zeros(8, np.int8), "wz")]
        nodes = [helper.make_node("QuantizeLinear", ["x", "s", "z"], ["xq"]),
                 helper.make_node("DequantizeLinear", ["xq", "s", "z"], ["xf"]),
                 helper.make_node("DequantizeLinear", ["w", "ws", "wz"], ["wf"], axis=0),
                 helper.make_node("Conv", ["xf", "wf"], ["y"], pads=[1, 1, 1, 1]),
                 helper.make_node("QuantizeLinear", ["y", "s", "z"], ["yq"]),
                 helper.make_node("DequantizeLinear", ["yq", "s", "z"], ["out"])]
    else:
        inits.append(numpy_helper.from_array(codes.astype(np.float32) * 0.01, "w"))
        nodes = [helper.make_node("Conv", ["x", "w"], ["out"], pads=[1, 1, 1, 1])]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 8, 16, 16])],
                              [helper.make_tensor_value_info("out", TensorProto.FLOAT, ["batch", 8, 16, 16])], inits)
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8), path)
    return path


@pytest.fixture
def models(tmp_path):
    return conv_model(tmp_path / "int8.onnx", True), conv_model(tmp_path / "fp32.onnx", False)


def test_bench_json_follows_the_contract(models):
    quantized, floating = models
    result = bench_models([str(quantized), str(floating)], BenchConfig(threads=1, runs=5, warmup=1))
    assert [m["path"] for m in result["models"]] == [str(quantized), str(floating)]
    for model, path in zip(result["models"], models):
        assert model["bytes"] == path.stat().st_size and model["threads"] == 1
        assert 0 < model["latency_ms"]["median"] <= model["latency_ms"]["p90"]
        assert all(isinstance(k, str) and isinstance(v, int) for k, v in model["ops"].items())
    first, second = result["models"]
    assert first["vs_first"] == {"latency": 1.0, "bytes": 1.0}
    assert second["vs_first"]["bytes"] == pytest.approx(second["bytes"] / first["bytes"])
    assert first["ops"].get("QLinearConv") == 1 and "Conv" not in first["ops"]  # what ORT ran, after fusion
    assert "QLinearConv" not in second["ops"]
    json.dumps(result)  # plain JSON types only


def test_census_reads_nodes_and_subgraphs_like_onnx_does(tmp_path):
    branch = lambda name, op: helper.make_graph([helper.make_node(op, ["a"], [f"{name}_out"])], name, [],
                                                [helper.make_tensor_value_info(f"{name}_out", TensorProto.FLOAT, [2])])
    nodes = [helper.make_node("Relu", ["x"], ["a"]), helper.make_node("Greater", ["a", "a"], ["c"]),
             helper.make_node("If", ["c"], ["y"], then_branch=branch("t", "Sigmoid"), else_branch=branch("e", "Relu"))]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    assert op_census(model.SerializeToString()) == {"Greater": 1, "If": 1, "Relu": 2, "Sigmoid": 1}


def test_bench_command_prints_a_table_and_writes_json(models, run_cli, tmp_path):
    quantized, floating = models
    code, out, err = run_cli("bench", quantized, "--against", floating, "--runs", "3", "--warmup", "1",
                             "--json", tmp_path / "bench.json")
    assert code == 0, err
    assert "median ms" in out and "QLinearConv×1" in out
    assert len(json.loads((tmp_path / "bench.json").read_text())["models"]) == 2


@pytest.mark.parametrize("args, message", [
    (["missing.onnx"], "not found"),
    (["garbage.onnx"], "onnxruntime cannot load"),
    (["int8.onnx", "--runs", "0"], "--runs"),
    (["int8.onnx", "--threads", "0"], "threads"),
    ([], "missing MODEL.onnx"),
])
def test_bench_mistakes_are_one_line_errors(models, run_cli, tmp_path, args, message):
    (tmp_path / "garbage.onnx").write_bytes(b"not a model")
    code, out, err = run_cli("bench", *[str(tmp_path / a) if a.endswith(".onnx") else a for a in args])
    assert code == 2 and err.startswith("error: ") and message in err and len(err.strip().splitlines()) == 1


def test_bench_runs_where_torch_and_onnx_are_not_installed(models, tmp_path):
    """The edge install: onnxruntime, numpy, click and rich only."""
    quantized, floating = models
    script = (
        "import sys\n"
        "sys.modules['torch'] = None; sys.modules['onnx'] = None  # importing either now fails\n"
        "from qtool.cli import main\n"
        f"main(['bench', {str(quantized)!r}, '--against', {str(floating)!r}, '--runs', '2', '--warmup', '0',"
        f" '--json', {str(tmp_path / 'edge.json')!r}])\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert done.returncode == 0, done.stderr
    assert json.loads((tmp_path / "edge.json").read_text())["models"][0]["ops"]["QLinearConv"] == 1


def test_kernel_modes_on_an_edge_install_say_what_to_install(tmp_path):
    script = ("import sys\nsys.modules['torch'] = None\nfrom qtool.cli import main\nmain(['bench', '--kernels'])\n")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert done.returncode == 2 and done.stderr.strip() == "error: torch is not installed; this mode needs `pip install qtool[train]`"
