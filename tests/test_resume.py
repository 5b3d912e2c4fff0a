"""Crash safety: a run killed with SIGKILL resumes to the bit-identical result of an uninterrupted
run; the trainer's state covers callbacks; divergence stops at once and keeps the last good
checkpoint; --resume refuses to silently change the run."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from reliability_helpers import one_thread, write_tiny_npz

from qtool.data import load_domains, split_domains
from qtool.models import build_model
from qtool.quant.prepare import prepare
from qtool.runs import training_state
from qtool.train.methods import method_names
from qtool.train.guard import DivergenceError
from qtool.train.resume import Checkpointing, read_training_checkpoint
from qtool.train.trainer import TrainConfig, Trainer

STEPS = 16  # QAT steps of the CLI runs; the first checkpoint lands at step 2


def _qtool(*args: str) -> list[str]:
    return [sys.executable, "-m", "qtool", "quantize", *args]


def test_killed_run_resumes_to_the_same_weights(tmp_path):
    data = write_tiny_npz(tmp_path / "tiny.npz")
    # GAQAT (when installed) adds its sign windows and freeze decisions to the state to restore.
    method = ["--method", "gaqat", "-O", "every=3", "-O", "window=4"] if "gaqat" in method_names() else ["--method", "sagm"]
    run = ["resnet20", "--data", data, "--target-domain", "d0", "--bits", "4", *method,
           "--steps", str(STEPS), "--pretrain-epochs", "0.5", "--batch-size", "8", "--evals", "3", "--threads", "1",
           "--checkpoint-every", "2", "--cache-dir", str(tmp_path / "cache")]
    killed, whole = tmp_path / "killed", tmp_path / "whole"

    victim = subprocess.Popen(_qtool(*run, "--out", str(killed)), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    checkpoint = killed / "checkpoints" / "qat.pt"
    while not checkpoint.exists() and victim.poll() is None:
        time.sleep(0.01)
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    assert victim.returncode == -signal.SIGKILL, victim.stderr.read().decode()[-2000:]
    assert not (killed / "model.pt").exists()  # it really died mid-run
    stopped_at = read_training_checkpoint(checkpoint)["training"]["step"]
    assert 2 <= stopped_at < STEPS

    resumed = subprocess.run(_qtool("--resume", str(killed)), capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    uninterrupted = subprocess.run(_qtool(*run, "--out", str(whole)), capture_output=True, text=True)
    assert uninterrupted.returncode == 0, uninterrupted.stderr[-2000:]

    a, b = (torch.load(d / "model.pt", weights_only=True) for d in (whole, killed))
    assert a["state_dict"].keys() == b["state_dict"].keys()
    for key, value in a["state_dict"].items():
        assert torch.equal(value, b["state_dict"][key]), key
    assert a["meta"]["report"] == b["meta"]["report"]


class DirectionJitter:
    """A callback with state that matters: its hook scales every update by a factor from its own
    generator, so a resumed run matches only if that generator's state was restored."""

    def __init__(self, trainer: Trainer):
        self.generator = torch.Generator().manual_seed(11)
        self.calls = 0
        trainer.optimizer.hooks.append(self)

    def __call__(self, grads) -> None:
        self.calls += 1
        factor = 0.5 + float(torch.rand(1, generator=self.generator))
        for d in grads.direction:
            d.mul_(factor)

    def state_dict(self) -> dict:
        return {"generator": self.generator.get_state(), "calls": self.calls}

    def load_state_dict(self, state: dict) -> None:
        self.generator.set_state(state["generator"])
        self.calls = state["calls"]


class Crash(Exception):
    pass


def _trainer(split, path: Path | None = None) -> Trainer:
    torch.manual_seed(0)
    model = prepare(build_model("resnet20", 4, 1), 3, 3, 8, inplace=True)
    config = TrainConfig(steps=7, batch_size=8, lr=1e-3, optimizer="gsam", evals=3)
    header = {"arch": "resnet20", "num_classes": 4, "in_channels": 1, "image_size": 28}
    trainer = Trainer(model, split, config, checkpointing=Checkpointing(path, header, every=2) if path else None)
    trainer.callbacks = [DirectionJitter(trainer)]
    return trainer


@pytest.fixture(autouse=True)
def _one_thread():
    with one_thread():
        yield


def test_trainer_state_round_trip_covers_optimizer_data_rng_callbacks_and_selection(tmp_path):
    split = split_domains(load_domains(write_tiny_npz(tmp_path / "tiny.npz")), "d0", seed=0)
    reference = _trainer(split)
    reference.fit()

    path = tmp_path / "state.pt"
    crashing = _trainer(split, path)

    def crash_at_step_5(record):
        if record["step"] == 5:  # after step 4's checkpoint and one more step
            raise Crash

    crashing.progress = crash_at_step_5
    with pytest.raises(Crash):
        crashing.fit()
    payload = read_training_checkpoint(path)
    assert payload["training"]["step"] == 4 and payload["training"]["selection"]["history"]

    resumed = _trainer(split)
    resumed.fit(resume=training_state(payload))
    for key, value in reference.model.state_dict().items():
        assert torch.equal(value, resumed.model.state_dict()[key]), key
    assert resumed.callbacks[0].calls == reference.callbacks[0].calls == 7
    assert resumed.selection.history == reference.selection.history


def test_non_finite_quantizer_scale_stops_training(tmp_path):
    split = split_domains(load_domains(write_tiny_npz(tmp_path / "tiny.npz")), "d0", seed=0)
    trainer = _trainer(split, tmp_path / "state.pt")
    scale = trainer.model.qtool_act.layers_0_0_relu1.scale  # the tensor quantizer before layers.0.0.conv2

    def poison_step_3(grads):  # the update of step 3 turns one step size into NaN
        if trainer.step == 2:
            grads.direction[[p is scale for p in grads.params].index(True)].fill_(float("nan"))

    trainer.optimizer.hooks.append(poison_step_3)
    with pytest.raises(DivergenceError, match=r"^training diverged at step 3: quantizer step size "
                                              r"qtool_act\.layers_0_0_relu1\.scale is not finite; "
                                              r"the last good checkpoint \(step 2\) is kept at "):
        trainer.fit()
    saved = read_training_checkpoint(tmp_path / "state.pt")
    assert saved["training"]["step"] == 2
    assert all(bool(v.isfinite().all()) for v in saved["state_dict"].values() if v.is_floating_point())


def test_nan_loss_is_one_line_exit_3_and_keeps_the_last_good_checkpoint(tmp_path, capsys):
    from qtool.cli import main

    out = tmp_path / "run"
    args = ["quantize", "resnet20", "--data", write_tiny_npz(tmp_path / "tiny.npz"), "--target-domain", "d0",
            "--bits", "4", "--method", "lsq", "--steps", "6", "--pretrain-epochs", "0.25", "--batch-size", "8",
            "--lr", "1e30", "--checkpoint-every", "1", "--cache-dir", str(tmp_path / "cache"), "--out", str(out)]
    with pytest.raises(SystemExit) as stop:
        main(args)
    assert stop.value.code == 3
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("error")]  # the rest: progress bars
    assert len(errors) == 1 and "Traceback" not in err, err
    assert errors[0].startswith("error: training diverged at step ")
    assert "the last good checkpoint (step " in errors[0] and str(out / "checkpoints" / "qat.pt") in errors[0]
    assert sorted(p.name for p in out.iterdir()) == ["checkpoints"]  # no model.pt, no report.json
    saved = read_training_checkpoint(out / "checkpoints" / "qat.pt")
    assert all(bool(v.isfinite().all()) for v in saved["state_dict"].values() if v.is_floating_point())


def test_resume_refuses_to_change_the_run(tmp_path, capsys):
    from qtool.cli import main

    def fails(*args: str) -> str:
        with pytest.raises(SystemExit) as stop:
            main(["quantize", *args])
        assert stop.value.code == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1, err
        return err[0]

    empty = tmp_path / "empty"
    empty.mkdir()
    assert fails("--resume", str(empty)) == (f"error: --resume {empty}: no checkpoint to resume from (expected "
                                             f"{empty}/checkpoints/qat.pt or {empty}/checkpoints/pretrain.pt)")
    out = tmp_path / "run"
    assert main(["quantize", "resnet20", "--data", write_tiny_npz(tmp_path / "tiny.npz"), "--target-domain", "d0",
                 "--steps", "2", "--pretrain-epochs", "0.25", "--batch-size", "8", "--method", "lsq",
                 "--cache-dir", str(tmp_path / "cache"), "--out", str(out)]) is None
    capsys.readouterr()
    assert fails("--resume", str(out), "--lr", "0.5") == (
        "error: --lr 0.5 differs from the interrupted run's 0.0002; a resumed run continues the same training "
        "(start a new run to change it)")
    assert fails("dg-cnn", "--resume", str(out)).startswith("error: MODEL 'dg-cnn' differs from the interrupted run's")
