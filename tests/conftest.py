"""Shared fixtures: the real digit domains (through the same --data path a user gives) and a
pre-training cache shared by the end-to-end tests of one session."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def digits_dg() -> str:
    path = Path(os.environ.get("QTOOL_DIGITS_DG", REPO.parent / "shared" / "data" / "digits_dg.npz"))
    if not path.exists():
        pytest.skip(f"digits_dg.npz not found at {path} (set QTOOL_DIGITS_DG)")
    return str(path)


@pytest.fixture(scope="session")
def digits_small(digits_dg, tmp_path_factory) -> str:
    """150 real images per digits_dg domain: end-to-end runs in seconds on 2 cores."""
    import numpy as np

    archive = np.load(digits_dg)
    path = tmp_path_factory.mktemp("data") / "digits_small.npz"
    np.savez(path, **{key: archive[key][:150] for key in archive.files})
    return str(path)


@pytest.fixture(scope="session")
def pretrain_cache(tmp_path_factory) -> str:
    return str(tmp_path_factory.mktemp("pretrain-cache"))


@pytest.fixture
def run_cli(capsys):
    """Run the qtool CLI in-process; returns (exit code, stdout, stderr)."""
    from qtool.cli import main

    def run(*args: str) -> tuple[int, str, str]:
        try:
            main([str(a) for a in args])
            code = 0
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else 1
        out, err = capsys.readouterr()
        return code, out, err

    return run
