"""Hostile and broken inputs: each is one ``error: ...`` line, a non-zero exit, no traceback, no
partial file, and no code from a file ever runs."""

from __future__ import annotations

import os
import pickle
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
from reliability_helpers import write_tiny_npz

from qtool.checkpoint import atomic_path, save_checkpoint
from qtool.cli import main
from qtool.errors import QtoolError
from qtool.models import build_model


class Payload:
    """Unpickling it runs ``os.system``: what a booby-trapped checkpoint would carry."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


@pytest.fixture
def cli(capsys):
    """Run the CLI in-process; returns (exit code, the lines it wrote to stderr)."""

    def run(*args) -> tuple[int, list[str]]:
        try:
            main([str(a) for a in args])
            code = 0
        except SystemExit as exc:
            code = exc.code
        return code, capsys.readouterr().err.strip().splitlines()

    return run


def _one_error(result: tuple[int, list[str]], code: int = 2) -> str:
    exit_code, lines = result
    assert exit_code == code and len(lines) == 1 and lines[0].startswith("error: "), result
    return lines[0]


def _no_leftovers(folder: Path) -> None:
    """No temporary file of an atomic write, no write probe left anywhere under ``folder``."""
    assert not [p for p in folder.rglob(".*") if p.is_file()], list(folder.rglob(".*"))


def _checkpoint(path: Path) -> Path:
    save_checkpoint(path, build_model("resnet20", 4, 1), "resnet20", 4, 1, 28, {})
    return path


def test_corrupt_checkpoints(tmp_path, cli):
    data = write_tiny_npz(tmp_path / "tiny.npz")
    good = _checkpoint(tmp_path / "good.pt")
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    flipped = tmp_path / "flipped.pt"
    raw = bytearray(good.read_bytes())
    raw[len(raw) // 2] ^= 0xFF  # inside tensor data: torch.load alone would load a wrong weight
    flipped.write_bytes(raw)
    foreign = tmp_path / "foreign.pt"
    torch.save({"weights": torch.ones(2)}, foreign)

    assert _one_error(cli("eval", truncated, "--data", data)) == (
        f"error: cannot read checkpoint {truncated}: corrupt or not a qtool checkpoint (File is not a zip file)")
    assert _one_error(cli("eval", flipped, "--data", data)).startswith(
        f"error: cannot read checkpoint {flipped}: corrupt or not a qtool checkpoint (record ")
    assert _one_error(cli("eval", flipped, "--data", data)).endswith("fails its CRC-32 check)")
    assert _one_error(cli("eval", foreign, "--data", data)) == f"error: {foreign} is not a qtool checkpoint"
    assert _one_error(cli("eval", tmp_path, "--data", data)) == (
        f"error: checkpoint {tmp_path} is a directory; pass the model.pt inside it")


def test_booby_trapped_checkpoints_run_no_code(tmp_path, cli):
    marker = tmp_path / "pwned"
    trapped = tmp_path / "trapped.pt"
    torch.save({"format": "qtool-checkpoint", "version": 1, "arch": "resnet20", "payload": Payload(marker)}, trapped)
    legacy = tmp_path / "legacy.pt"
    legacy.write_bytes(pickle.dumps(Payload(marker)))
    # The trap is real: an unrestricted load runs the command.
    torch.load(trapped, weights_only=False)
    assert marker.exists()
    marker.unlink()

    data = write_tiny_npz(tmp_path / "tiny.npz")
    refused = ("it holds Python objects (posix.system), not only tensors and plain values, and loading those "
               "could run code")
    assert _one_error(cli("eval", trapped, "--data", data)) == f"error: refusing checkpoint {trapped}: {refused}"
    assert _one_error(cli("eval", legacy, "--data", data)).endswith("(File is not a zip file)")
    # The same file as a starting model, and as the state of a run to resume.
    assert refused in _one_error(cli("quantize", trapped, "--data", data, "--out", tmp_path / "a"))
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    shutil.copy(trapped, run / "checkpoints" / "qat.pt")
    assert refused in _one_error(cli("quantize", "--resume", run))
    assert not marker.exists()
    assert not (tmp_path / "a").exists()


def _npz(path: Path, **arrays) -> str:
    np.savez(path, **arrays)
    return str(path)


def test_bad_datasets(tmp_path, cli):
    images = np.zeros((10, 28, 28, 1), np.uint8)
    labels = np.zeros(10, np.int64)
    short = _npz(tmp_path / "short.npz", a_x=images, a_y=labels[:9], b_x=images, b_y=labels)
    floats = _npz(tmp_path / "floats.npz", a_x=images.astype(np.float32), a_y=labels, b_x=images, b_y=labels)
    objects = _npz(tmp_path / "objects.npz", a_x=np.array([Payload(tmp_path / "pwned")], dtype=object), a_y=labels)
    folder = tmp_path / "folder"
    for domain in ("photo", "sketch"):
        (folder / domain / "cat").mkdir(parents=True)
        Image = pytest.importorskip("PIL.Image")
        Image.new("RGB", (32, 32)).save(folder / domain / "cat" / "ok.png")
    broken = folder / "sketch" / "cat" / "broken.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 40)  # a PNG signature, then garbage

    def quantize(data: str) -> str:
        out = tmp_path / "out"
        message = _one_error(cli("quantize", "resnet20", "--data", data, "--out", out))
        assert not out.exists()  # nothing was created for a run that never started
        return message

    assert quantize(short) == f"error: {short}: domain 'a': 10 images but 9 labels"
    assert quantize(floats) == f"error: {floats}: domain 'a': images must be uint8, got float32"
    assert quantize(objects).startswith(f"error: cannot read domain 'a' of {objects}: Object arrays cannot be loaded")
    assert not (tmp_path / "pwned").exists()
    assert quantize(str(folder)).startswith(f"error: cannot decode image {broken}: cannot identify image file")
    _no_leftovers(tmp_path)


def test_output_path_that_is_a_directory(tmp_path, cli):
    folder = tmp_path / "model.onnx"
    folder.mkdir()
    with pytest.raises(QtoolError, match=f"^cannot write {folder}: it is a directory; give a file name$"):
        with atomic_path(folder) as tmp:
            tmp.write_bytes(b"never")
    data = write_tiny_npz(tmp_path / "tiny.npz")
    assert _one_error(cli("eval", _checkpoint(tmp_path / "good.pt"), "--data", data, "--json", folder)) == (
        f"error: Invalid value for '--json': File '{folder}' is a directory.")
    not_a_folder = tmp_path / "file"
    not_a_folder.write_text("")
    assert _one_error(cli("quantize", "resnet20", "--data", data, "--out", not_a_folder)) == (
        f"error: Invalid value for '--out': Directory '{not_a_folder}' is a file.")
    assert list(folder.iterdir()) == []
    _no_leftovers(tmp_path)


@pytest.fixture
def read_only_folder(tmp_path):
    """A folder nobody can write to, root included (root ignores the mode bits, so it also
    gets the immutable attribute where the filesystem allows it)."""
    folder = tmp_path / "read-only"
    folder.mkdir()
    folder.chmod(0o555)
    immutable = os.geteuid() == 0 and shutil.which("chattr") is not None and subprocess.run(
        ["chattr", "+i", str(folder)], capture_output=True).returncode == 0
    try:
        probe = folder / "probe"
        try:
            probe.touch()
            probe.unlink()
            pytest.skip("cannot make a read-only folder here (root without the immutable attribute)")
        except OSError:
            pass
        yield folder
    finally:
        if immutable:
            subprocess.run(["chattr", "-i", str(folder)], check=True)
        folder.chmod(0o755)


def test_read_only_output_folder(read_only_folder, tmp_path, cli):
    data = write_tiny_npz(tmp_path / "tiny.npz")
    message = _one_error(cli("quantize", "resnet20", "--data", data, "--out", read_only_folder / "run"))
    assert message in (f"error: cannot write to --out {read_only_folder / 'run'}: Permission denied",
                       f"error: cannot write to --out {read_only_folder / 'run'}: Operation not permitted")
    with pytest.raises(QtoolError, match=f"^cannot write {read_only_folder / 'report.json'}: "):
        with atomic_path(read_only_folder / "report.json") as tmp:
            tmp.write_text("{}")
    assert list(read_only_folder.iterdir()) == []


def test_bad_values_deep_in_the_library_are_one_line_errors(tmp_path, cli):
    """Checks that live past ``validate`` (the sampler, the optimizer, the checkpoint's plan)
    still give one ``error:`` line, not a traceback (``qtool.errors``: the rule)."""
    data = write_tiny_npz(tmp_path / "tiny.npz")  # three domains, all sources
    common = ("--data", data, "--no-cache", "--pretrain-epochs", "0.01", "--steps", "1", "--threads", "1")
    assert "smaller than the number of source domains (3)" in _one_error(
        cli("quantize", "resnet20", "--batch-size", 2, *common, "--out", tmp_path / "a"))
    code, lines = cli("quantize", "resnet20", "--rho", -1, *common, "--out", tmp_path / "b")
    assert code == 2 and lines[-1] == "error: --rho must be non-negative, got -1.0"  # after pre-training's bar
    model = build_model("resnet20", 4, 1)
    model.qtool_plan = {"layers.9.conv1": {"bits": 4, "act_bits": 4}}  # a layer resnet20 does not have
    save_checkpoint(tmp_path / "plan.pt", model, "resnet20", 4, 1, 28, {})
    assert _one_error(cli("eval", tmp_path / "plan.pt", "--data", data)).startswith(
        "error: the checkpoint's quantization plan does not fit the resnet20 architecture: layer 'layers.9.conv1'")
