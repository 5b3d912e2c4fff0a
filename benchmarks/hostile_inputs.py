"""Feed qtool broken and booby-trapped inputs through the real CLI and print what each one gets:
exit code, stderr, whether a trap ran and whether files were left behind. The table in
docs/BENCHMARKS.md (reliability) is this script's output:

    python benchmarks/hostile_inputs.py
"""

from __future__ import annotations

import os
import pickle
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from qtool.checkpoint import save_checkpoint
from qtool.models import build_model


class Trap:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def qtool(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "qtool", *map(str, args)], capture_output=True, text=True)


def main() -> None:
    root = Path(tempfile.mkdtemp())
    marker = root / "TRAP-RAN"
    images, labels = np.zeros((10, 28, 28, 1), np.uint8), np.zeros(10, np.int64)
    np.savez(root / "tiny.npz", a_x=images, a_y=labels, b_x=images, b_y=labels)
    data = root / "tiny.npz"

    good = root / "good.pt"
    save_checkpoint(good, build_model("resnet20", 10, 1), "resnet20", 10, 1, 28, {})
    (root / "truncated.pt").write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    flipped = bytearray(good.read_bytes())
    flipped[len(flipped) // 2] ^= 0xFF
    (root / "bit-flipped.pt").write_bytes(flipped)
    torch.save({"format": "qtool-checkpoint", "version": 1, "arch": "resnet20", "x": Trap(marker)}, root / "trapped.pt")
    (root / "trapped-legacy.pt").write_bytes(pickle.dumps(Trap(marker)))
    resume = root / "resume-trapped" / "checkpoints"
    resume.mkdir(parents=True)
    shutil.copy(root / "trapped.pt", resume / "qat.pt")
    np.savez(root / "short.npz", a_x=images, a_y=labels[:9], b_x=images, b_y=labels)
    np.savez(root / "floats.npz", a_x=images.astype(np.float32), a_y=labels, b_x=images, b_y=labels)
    np.savez(root / "objects.npz", a_x=np.array([Trap(marker)], dtype=object), a_y=labels)
    for domain in ("photo", "sketch"):
        (root / "folder" / domain / "cat").mkdir(parents=True)
        Image.new("RGB", (32, 32)).save(root / "folder" / domain / "cat" / "ok.png")
    (root / "folder" / "sketch" / "cat" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 40)
    (root / "out.onnx").mkdir()
    read_only = root / "read-only"
    read_only.mkdir()
    read_only.chmod(0o555)
    immutable = os.geteuid() == 0 and subprocess.run(["chattr", "+i", str(read_only)], capture_output=True).returncode == 0

    cases = [
        ("truncated checkpoint", ["eval", root / "truncated.pt", "--data", data]),
        ("one flipped byte in the tensor data", ["eval", root / "bit-flipped.pt", "--data", data]),
        ("checkpoint whose pickle runs os.system", ["eval", root / "trapped.pt", "--data", data]),
        ("the same, as the starting MODEL", ["quantize", root / "trapped.pt", "--data", data, "--out", root / "o1"]),
        ("the same, as the state to --resume", ["quantize", "--resume", root / "resume-trapped"]),
        ("legacy (non-zip) pickle with os.system", ["eval", root / "trapped-legacy.pt", "--data", data]),
        ("npz: 10 images, 9 labels", ["quantize", "resnet20", "--data", root / "short.npz", "--out", root / "o2"]),
        ("npz: float32 images", ["quantize", "resnet20", "--data", root / "floats.npz", "--out", root / "o3"]),
        ("npz: pickled object array", ["quantize", "resnet20", "--data", root / "objects.npz", "--out", root / "o4"]),
        ("image folder with an undecodable PNG", ["quantize", "resnet20", "--data", root / "folder", "--out", root / "o5"]),
        ("--json path that is a directory", ["eval", good, "--data", data, "--json", root / "out.onnx"]),
        ("--out inside a read-only folder", ["quantize", "resnet20", "--data", data, "--out", read_only / "run"]),
        ("--resume of a folder with no checkpoint", ["quantize", "--resume", root / "out.onnx"]),
        ("export -o a directory", ["export", good, "-o", root / "out.onnx", "--data", data]),
        ("export -o inside a read-only folder", ["export", good, "-o", read_only / "m.onnx", "--data", data]),
        ("bench of a directory", ["bench", root / "out.onnx"]),
        ("bench of a file that is not ONNX", ["bench", root / "truncated.pt"]),
    ]
    print("| input | exit | stderr | trap ran | files left |")
    print("|---|---|---|---|---|")
    for name, args in cases:
        before = {p for p in root.rglob("*")}
        result = qtool(*args)
        left = sorted(str(p.relative_to(root)) for p in set(root.rglob("*")) - before)
        err = result.stderr.strip().replace(str(root), "TMP").replace("|", "\\|").replace("\n", " / ")
        print(f"| {name} | {result.returncode} | `{err}` | {'YES' if marker.exists() else 'no'} | {left or 'none'} |")
    if immutable:
        subprocess.run(["chattr", "-i", str(read_only)], check=True)
    read_only.chmod(0o755)
    shutil.rmtree(root)


if __name__ == "__main__":
    main()
