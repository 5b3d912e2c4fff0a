"""Data-parallel QAT on 2 CPU processes (gloo) equals one process with the same global batch.

- In float64 through the Python API: the final weights agree to 1e-9 (they differ only by the
  summation order of the gradient all-reduce and the global BatchNorm statistics), both ranks
  hold bit-identical weights, and the hook statistics GAQAT decides from (sign agreement of the
  task and smoothness gradients of every quantizer scale), and GAQAT's own freeze decisions, are
  identical on every rank and equal to the single-process ones.
- Through the CLI (``--nproc 2``, float32): distributed pre-training fills the cache from rank 0
  only, rank 0 alone writes the run folder, and one full-precision SAGM step from the cached
  model gives the weights a 1-process run gets, up to float32 rounding. (A float32 *quantized*
  step cannot be compared this way: an activation a rounding error away from a grid boundary
  moves by a whole quantization step, so the fused and the reference fake-quant kernels, or 1
  and 2 processes, already give different low-bit gradients; that math is checked in float64.)
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import ddp_worker
import pytest
import torch
from reliability_helpers import one_thread, write_tiny_npz

TESTS = Path(__file__).resolve().parent


def _start(args: list[str], **kwargs) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=env, **kwargs)


def _finish(process: subprocess.Popen) -> str:
    out, err = process.communicate(timeout=300)
    assert process.returncode == 0, err[-3000:]
    return out + err


def _torchrun(nproc: int, *args: str) -> list[str]:
    return ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", *args]


def test_two_processes_train_like_one_in_float64(tmp_path):
    data = write_tiny_npz(tmp_path / "tiny.npz")
    single, double = tmp_path / "single", tmp_path / "ddp"
    single.mkdir(), double.mkdir()
    ranks_run = _start(_torchrun(2, str(TESTS / "ddp_worker.py"), data, str(double)))
    with one_thread():
        ddp_worker.train(data, str(single))  # the single-process reference, here, meanwhile
    _finish(ranks_run)
    one = torch.load(single / "rank0.pt", weights_only=True)
    ranks = [torch.load(double / f"rank{r}.pt", weights_only=True) for r in (0, 1)]

    # Every rank holds the same weights, and saw the same statistics at every step.
    for key, value in ranks[0]["state"].items():
        assert torch.equal(value, ranks[1]["state"][key]), key
    for seen0, seen1 in zip(ranks[0]["probe"], ranks[1]["probe"]):
        assert torch.equal(seen0["agreement"], seen1["agreement"])
        assert torch.equal(seen0["grad_norm"], seen1["grad_norm"])

    # ...and they are the single process's, to float64 rounding.
    assert one["state"].keys() == ranks[0]["state"].keys()
    for key, value in one["state"].items():
        if value.is_floating_point():
            torch.testing.assert_close(ranks[0]["state"][key], value, rtol=1e-9, atol=1e-12, msg=key)
        else:
            assert torch.equal(ranks[0]["state"][key], value), key
    assert len(one["probe"]) == len(ranks[0]["probe"]) == 4
    for seen, reference in zip(ranks[0]["probe"], one["probe"]):
        assert torch.equal(seen["agreement"], reference["agreement"])
        torch.testing.assert_close(seen["grad_norm"], reference["grad_norm"], rtol=1e-9, atol=0)
    # Model selection: same validation accuracies (summed integer counts), same choice.
    assert [h["val"] for h in ranks[0]["history"]] == [h["val"] for h in one["history"]]
    # GAQAT's measures and freeze decisions: the same on both ranks and as in one process.
    assert ranks[0]["reports"] == ranks[1]["reports"] == one["reports"]
    if "gaqat" in one["reports"]:
        assert len(one["reports"]["gaqat"]["frozen"]) == 2


def test_nproc_cli_writes_from_rank_0_and_matches_one_process(tmp_path):
    cache, two, one = tmp_path / "cache", tmp_path / "two", tmp_path / "one"
    common = ["resnet20", "--data", write_tiny_npz(tmp_path / "tiny.npz"), "--target-domain", "d0", "--bits", "32",
              "--method", "sagm", "--steps", "1", "--pretrain-epochs", "1", "--batch-size", "8", "--evals", "1",
              "--threads", "1", "--cache-dir", str(cache)]
    _finish(_start(["-m", "qtool", "quantize", *common, "--out", str(two), "--nproc", "2"]))
    cached = list(cache.iterdir())
    assert [p.suffix for p in cached] == [".pt"]  # one cache entry, no temporary file from a second writer
    _finish(_start(["-m", "qtool", "quantize", *common, "--out", str(one)]))  # starts from that cached model

    files = sorted(str(p.relative_to(two)) for p in two.rglob("*") if p.is_file())
    # rank 0 alone writes the results (the convergence plot among them), once
    assert files == ["checkpoints/pretrain.pt", "checkpoints/qat.pt", "convergence.png", "model.pt", "report.json"]
    report2, report1 = (json.loads((d / "report.json").read_text()) for d in (two, one))
    assert report2["throughput"]["processes"] == 2 and report1["throughput"]["processes"] == 1
    assert report1["full_precision"] == report2["full_precision"]

    # One Adam step moves every weight by about lr * sign(gradient): a weight ends up elsewhere
    # only where its gradient sum is float32 noise (its sign depends on the summation order).
    w2, w1 = (torch.load(d / "model.pt", weights_only=True)["state_dict"] for d in (two, one))
    same = total = 0
    for key, value in w1.items():
        if value.is_floating_point():
            same += int(torch.isclose(w2[key], value, rtol=1e-5, atol=1e-7).sum())
            total += value.numel()
    assert same / total > 0.98, f"only {same / total:.3%} of the weights agree"


def test_nproc_checks_options_before_starting_workers(tmp_path, capsys):
    from qtool.cli import main

    with pytest.raises(SystemExit) as stop:
        main(["quantize", "resnet20", "--bits", "5", "--nproc", "2", "--out", str(tmp_path / "run")])
    assert stop.value.code == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        "error: --bits must be one of 1, 2, 3, 4, 8 (or 32 for full precision), got 5"]
    assert not (tmp_path / "run").exists()
