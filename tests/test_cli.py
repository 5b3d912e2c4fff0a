"""End-to-end `qtool quantize` / `qtool eval` on real digit domains, and the user-error contract:
one `error:` line, exit code 2, nothing half-written."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

CONTRACT_KEYS = {"model", "method", "bits", "act_bits", "seed", "target_domain", "source_domains", "accuracy",
                 "target_accuracy", "source_val_accuracy", "seconds", "steps"}


def quick_args(data, cache, out, *extra):
    return ["quantize", "resnet20", "--data", data, "--target-domain", "mnist_m", "--bits", "4",
            "--method", "sagm", "--steps", "3", "--pretrain-epochs", "0.5", "--batch-size", "32",
            "--evals", "1", "--cache-dir", cache, "--out", str(out), *extra]


def test_quantize_then_eval_reproduces_the_report(run_cli, digits_small, pretrain_cache, tmp_path):
    code, out, err = run_cli(*quick_args(digits_small, pretrain_cache, tmp_path / "run"))
    assert code == 0, err
    report = json.loads((tmp_path / "run" / "report.json").read_text())
    assert CONTRACT_KEYS <= set(report)
    assert report["source_domains"] == ["mnist", "syn"] and report["target_domain"] == "mnist_m"
    assert set(report["accuracy"]) == {"mnist", "mnist_m", "syn"}
    assert all(0.0 <= a <= 1.0 for a in report["accuracy"].values())
    assert report["target_accuracy"] == report["accuracy"]["mnist_m"]
    assert report["steps"] == 3 and (report["bits"], report["act_bits"]) == (4, 4)
    assert "resnet20 W4A4 sagm" in out

    code, out, err = run_cli("eval", tmp_path / "run" / "model.pt", "--data", digits_small,
                             "--json", tmp_path / "eval.json")
    assert code == 0, err
    evaluated = json.loads((tmp_path / "eval.json").read_text())
    assert evaluated["accuracy"] == report["accuracy"]  # same split, same model, same numbers
    assert evaluated["source_val_accuracy"] == report["source_val_accuracy"]

    # The same model/data/target/seed reuses the cached full-precision pre-training.
    code, _, err = run_cli(*quick_args(digits_small, pretrain_cache, tmp_path / "again"))
    assert code == 0 and "from cache" in err


def test_checkpoint_is_a_plain_weights_only_file(run_cli, digits_small, pretrain_cache, tmp_path):
    code, _, err = run_cli(*quick_args(digits_small, pretrain_cache, tmp_path / "run", "--bits", "3", "--act-bits", "4"))
    assert code == 0, err
    payload = torch.load(tmp_path / "run" / "model.pt", weights_only=True)
    assert payload["arch"] == "resnet20" and payload["plan"]["layers.0.0.conv1"] == {"bits": 3, "act_bits": 4}


def test_config_file_sets_defaults_and_flags_override(run_cli, digits_small, pretrain_cache, tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text(f"data: {digits_small}\ntarget-domain: syn\nbits: 3\nmethod: lsq\nsteps: 2\n"
                      f"pretrain_epochs: 0.5\nbatch_size: 32\nevals: 1\ncache_dir: {pretrain_cache}\n")
    code, _, err = run_cli("quantize", "resnet20", "--config", config, "--bits", "8", "--out", tmp_path / "run")
    assert code == 0, err
    report = json.loads((tmp_path / "run" / "report.json").read_text())
    assert (report["bits"], report["method"], report["target_domain"], report["steps"]) == (8, "lsq", "syn", 2)


@pytest.mark.parametrize("args,message", [
    (["quantize", "resnet99", "--out", "{out}"], "unknown model 'resnet99'"),
    (["quantize", "resnet20", "--bits", "5", "--out", "{out}"], "--bits must be one of"),
    (["quantize", "resnet20", "--bits", "4", "--act-bits", "16", "--out", "{out}"], "--act-bits must be one of"),
    (["quantize", "resnet20", "--method", "magic", "--out", "{out}"], "unknown method 'magic'"),
    (["quantize", "resnet20", "--data", "{tmp}/missing.npz", "--steps", "1", "--out", "{out}"], "data not found"),
    (["quantize", "resnet20", "--data", "{small}", "--target-domain", "svhn", "--steps", "1", "--out", "{out}"],
     "unknown domain 'svhn'"),
    (["quantize", "resnet20", "--bits", "1", "--method", "sagm", "--out", "{out}"], "--bits 1 needs a binary estimator"),
    (["eval", "{tmp}/missing.pt"], "checkpoint not found"),
    (["eval", "{tmp}/corrupt.pt"], "corrupt or not a qtool checkpoint"),
    (["quantize", "resnet20", "--option", "tau", "--out", "{out}"], "--option expects KEY=VALUE"),
])
def test_user_errors_are_one_line_and_write_nothing(run_cli, digits_small, tmp_path, args, message):
    (tmp_path / "corrupt.pt").write_bytes(b"PK\x03\x04 truncated zip")
    out = tmp_path / "out"
    filled = [a.format(out=out, tmp=tmp_path, small=digits_small) for a in args]
    code, stdout, err = run_cli(*filled)
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], err
    assert not (out / "model.pt").exists() and not (out / "report.json").exists()


def test_out_that_is_a_file_is_rejected(run_cli, tmp_path):
    (tmp_path / "taken").write_text("x")
    code, _, err = run_cli("quantize", "resnet20", "--out", tmp_path / "taken")
    assert code == 2 and err.startswith("error: ") and "is a file" in err and len(err.strip().splitlines()) == 1


def test_console_entry_point_prints_no_traceback(tmp_path):
    result = subprocess.run([sys.executable, "-m", "qtool", "eval", str(tmp_path / "nope.pt")],
                            capture_output=True, text=True)
    assert result.returncode == 2
    assert result.stderr.strip() == f"error: checkpoint not found: {tmp_path / 'nope.pt'}"
    help_text = subprocess.run([sys.executable, "-m", "qtool", "quantize", "--help"], capture_output=True, text=True)
    assert help_text.returncode == 0 and "--target-domain" in help_text.stdout and "[default: sagm]" in help_text.stdout


def test_same_seed_same_model_and_fp_checkpoint_as_start(run_cli, digits_small, tmp_path):
    """Deterministic with --seed (pre-training included: no cache), and a full-precision run
    (--bits 32) writes a checkpoint that quantize accepts as MODEL."""
    common = ["--data", digits_small, "--target-domain", "syn", "--steps", "2", "--pretrain-epochs", "0.3",
              "--batch-size", "32", "--evals", "1", "--no-cache"]
    for name in ("a", "b"):
        code, _, err = run_cli("quantize", "dg-cnn", "--bits", "32", *common, "--out", tmp_path / name)
        assert code == 0, err
    first = torch.load(tmp_path / "a" / "model.pt", weights_only=True)["state_dict"]
    second = torch.load(tmp_path / "b" / "model.pt", weights_only=True)["state_dict"]
    assert all(torch.equal(first[k], second[k]) for k in first)

    code, _, err = run_cli("quantize", tmp_path / "a" / "model.pt", "--bits", "4", *common, "--out", tmp_path / "q")
    assert code == 0, err
    report = json.loads((tmp_path / "q" / "report.json").read_text())
    assert report["model"] == "dg-cnn" and report["full_precision"]["checkpoint"].endswith("model.pt")
    code, _, err = run_cli("quantize", tmp_path / "q" / "model.pt", "--bits", "4", *common, "--out", tmp_path / "qq")
    assert code == 2 and "already quantized" in err
