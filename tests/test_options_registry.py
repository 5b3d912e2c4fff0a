"""One place for defaults: the command line, ``TrainConfig`` and the optimizer registry agree,
and every method's ``-O`` options are checked the same way."""

from __future__ import annotations

import re
from dataclasses import MISSING, fields

import pytest

from qtool.cli import main, quantize
from qtool.errors import QtoolError
from qtool.options import QuantizeOptions
from qtool.pipeline import validate
from qtool.quant.binarize import BinaryOptions
from qtool.train.gaqat import GAQATConfig
from qtool.train.methods import get_method, method_names
from qtool.train.optim import OPTIMIZERS, build_optimizer
from qtool.train.trainer import TrainConfig

CLI = {param.name: param for param in quantize.params}


def test_cli_defaults_are_quantize_options_defaults():
    for item in fields(QuantizeOptions):
        if item.name in CLI and item.default is not MISSING:
            assert CLI[item.name].default == item.default, item.name


def test_train_config_defaults_are_the_cli_defaults():
    config = TrainConfig()
    for name in ("epochs", "steps", "batch_size", "lr", "weight_decay", "rho", "alpha", "seed", "augment", "evals"):
        assert getattr(config, name) == CLI[name].default, name
    assert config.optimizer == get_method(CLI["method"].default).optimizer


def test_every_optimizer_the_cli_accepts_is_registered_and_vice_versa(tmp_path):
    listed = re.findall(r"[a-z]+", CLI["pretrain_method"].help.split(":", 1)[1])
    assert listed == list(OPTIMIZERS)
    for name in OPTIMIZERS:
        validate(QuantizeOptions(model="resnet20", out=str(tmp_path / "run"), pretrain_method=name))
    with pytest.raises(QtoolError, match="unknown --pretrain-method 'adamw'; choose from plain, sam, gsam, sagm"):
        validate(QuantizeOptions(model="resnet20", out=str(tmp_path / "run"), pretrain_method="adamw"))
    assert {get_method(name).optimizer for name in method_names()} <= set(OPTIMIZERS)
    assert set(re.findall(r"[a-z]+", CLI["method"].help)) - {"bits", "binary"} == set(method_names())
    for name, entry in OPTIMIZERS.items():  # --alpha's help states each family's default
        if "alpha" in entry.defaults:
            assert f"{name.upper()}'s alpha (default {entry.defaults['alpha']:g})" in CLI["alpha"].help


def test_build_optimizer_uses_the_registry_defaults():
    import torch

    base = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
    for name, entry in OPTIMIZERS.items():
        optimizer = build_optimizer(name, base, rho=None, alpha=None)
        assert type(optimizer) is entry.build
        assert {key: getattr(optimizer, key) for key in entry.defaults} == entry.defaults
    assert build_optimizer("gsam", base, rho=0.2, alpha=0.3).alpha == 0.3


def _quantize_error(tmp_path, capsys, *args) -> str:
    with pytest.raises(SystemExit) as exit_info:
        main(["quantize", "resnet20", "--out", str(tmp_path / "run"), *args])
    assert exit_info.value.code == 2
    return capsys.readouterr().err.strip()


@pytest.mark.parametrize("method, bits, options", [("gaqat", "4", GAQATConfig), ("reste", "1", BinaryOptions)])
def test_a_bad_option_is_the_same_one_line_error_for_every_method(tmp_path, capsys, method, bits, options):
    err = _quantize_error(tmp_path, capsys, "--bits", bits, "--method", method, "-O", "bogus=1")
    valid = ", ".join(item.name for item in fields(options))
    assert err == f"error: unknown {method} option bogus; valid options: {valid}"
    number = next(item.name for item in fields(options) if type(item.default) is float)
    err = _quantize_error(tmp_path, capsys, "--bits", bits, "--method", method, "-O", f"{number}=low")
    assert err == f"error: {method} option {number} must be a number, got 'low'"
    assert not (tmp_path / "run").exists()


def test_a_method_without_options_rejects_any(tmp_path, capsys):
    err = _quantize_error(tmp_path, capsys, "--method", "sagm", "-O", "tau=0.1")
    assert err == "error: method sagm takes no -O options, got tau"
