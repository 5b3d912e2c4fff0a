"""benchmarks/gaqat_grid.py and binary_bench.py: the pre-training phase caches the starts the QAT runs then read (same
cache key from both paths), results land in --results, and a re-invocation skips what is done."""

import json
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import gaqat_grid  # noqa: E402
import binary_bench  # noqa: E402
import gaqat_disorder  # noqa: E402


class Captured(Exception):
    pass


def cli_options(monkeypatch, argv: list[str]):
    """The QuantizeOptions the qtool CLI builds from ``argv`` (training replaced by a capture)."""
    import qtool.pipeline
    from qtool.cli import main

    seen = {}

    def capture(options, progress=None, explicit=None):
        seen["options"] = options
        raise Captured

    monkeypatch.setattr(qtool.pipeline, "quantize", capture)
    with pytest.raises(Captured):
        main(argv)
    return seen["options"]


def test_pretrain_phase_and_qat_commands_share_the_cache_key(monkeypatch, tmp_path):
    from qtool.pipeline import pretrain_key

    args = gaqat_grid.parse_args(["--out", str(tmp_path), "--cache-dir", str(tmp_path / "cache"), "--pretrain-epochs", "3"])
    data = SimpleNamespace(image_size=32)
    pair = [job for job in gaqat_grid.plan(args) if (job.target, job.seed) == ("mnist_m", 1)]
    for job in (pair[0], pair[-1]):  # w3-sagm, w4-lsq
        command = gaqat_grid.command(args, job)
        options = cli_options(monkeypatch, command[3:])  # after "python -m qtool"
        assert options.cache_dir == str(tmp_path / "cache") and options.device == "cpu" and options.threads == 1
        assert pretrain_key(options, data) == pretrain_key(gaqat_grid.pretrain_options(args, "mnist_m", 1), data)


def test_plan_runs_the_paired_gaqat_sagm_comparisons_first():
    jobs = gaqat_grid.plan(gaqat_grid.parse_args([]))
    names = [job.name for job in jobs]
    assert len(jobs) == len({(j.target, j.seed, j.name) for j in jobs}) == 9 * 9  # 9 pairs x 9 runs
    assert names[:2] == ["w3-sagm", "w3-gaqat"] and (jobs[0].target, jobs[0].seed) == (jobs[1].target, jobs[1].seed)
    assert set(names[:18]) == {"w3-sagm", "w3-gaqat"} and set(names[18:36]) == {"w4-sagm", "w4-gaqat"}
    assert set(names[36:45]) == {"fp32-sagm"}
    assert set(names[45:54]) == {"w3-gaqat-layer"} and set(names[54:63]) == {"w4-gaqat-layer"}
    assert set(names[63:]) == {"w3-lsq", "w4-lsq"}
    layer = next(job for job in jobs if job.name == "w3-gaqat-layer")
    assert layer.method == "gaqat" and layer.options == ["freeze=layer"] and layer.bits == 3


def test_default_data_is_the_readme_relative_path():
    args = gaqat_grid.parse_args([])
    repo = Path(gaqat_grid.__file__).resolve().parents[1]
    assert Path(args.data).resolve() == (repo.parent / "shared" / "data" / "digits_dg.npz").resolve()
    assert "/work/shared" not in Path(gaqat_grid.__file__).read_text()


def test_grid_resumes_into_results_and_reuses_the_pretrained_start(digits_small, tmp_path, capsys):
    common = ["--quick", "--data", digits_small, "--out", str(tmp_path / "runs"), "--results", str(tmp_path / "results"),
              "--cache-dir", str(tmp_path / "cache"), "--evals", "3"]
    gaqat_grid.main([*common, "--pretrain-only"])
    start = json.loads((tmp_path / "results" / "mnist_m" / "seed0" / "fp-pretrain.json").read_text())
    curve, budget = start["convergence"]["curve"], start["convergence"]["budget"]
    assert (tmp_path / "runs" / "mnist_m" / "seed0" / "fp-pretrain" / "convergence.png").exists()
    assert curve and len(curve) == budget["evals"] and budget["steps"] == start["steps"]
    gaqat_grid.main([*common, "--pretrain-only"])
    assert "skip (done)" in capsys.readouterr().out
    # killed after its last checkpoint, before the result and the cache entry were written: resumed
    (tmp_path / "results" / "mnist_m" / "seed0" / "fp-pretrain.json").unlink()
    for entry in (tmp_path / "cache").iterdir():
        entry.unlink()
    gaqat_grid.main([*common, "--pretrain-only"])
    assert "(resumed)" in capsys.readouterr().out
    again = json.loads((tmp_path / "results" / "mnist_m" / "seed0" / "fp-pretrain.json").read_text())
    assert again["convergence"] == start["convergence"] and again["pretrain_key"] == start["pretrain_key"]
    with pytest.raises(SystemExit) as found:
        gaqat_grid.main([*common, "--check-starts"])
    assert found.value.code == 0 and "mnist_m seed 0: cached" in capsys.readouterr().out
    with pytest.raises(SystemExit) as missing:  # other pre-training settings: another start
        gaqat_grid.main([*common[1:], "--check-starts", "--targets", "mnist_m", "--seeds", "0", "--pretrain-epochs", "0.1"])
    assert missing.value.code == 1 and "MISSING" in capsys.readouterr().out

    gaqat_grid.main([*common, "--methods", "lsq", "--no-overhead"])
    results = sorted(p.name for p in (tmp_path / "results" / "mnist_m" / "seed0").iterdir())
    assert results == ["fp-pretrain.json", "fp32-sagm.json", "w4-lsq.json"]
    run = json.loads((tmp_path / "results" / "mnist_m" / "seed0" / "w4-lsq.json").read_text())
    assert run["full_precision"]["pretrain_key"] == start["pretrain_key"]  # the cached start, not a new one
    assert run["convergence"]["pretrain"] == start["convergence"] and len(run["convergence"]["qat"]["curve"]) == 3
    assert run["device"] == "cpu" and "--method lsq" in run["command"]
    capsys.readouterr()
    gaqat_grid.main([*common, "--methods", "lsq", "--no-overhead"])
    assert " s  " not in capsys.readouterr().out  # nothing ran again


def test_binary_bench_writes_paired_results_and_skips_them_next_time(digits_small, tmp_path, capsys):
    common = ["accuracy", "--data", digits_small, "--out", str(tmp_path / "runs"), "--results",
              str(tmp_path / "results"), "--seeds", "0", "--epochs", "2", "--pretrain-epochs", "0.5",
              "--batch-size", "64", "--evals", "2", "--workers", "2"]  # a pair side by side
    binary_bench.main(common)
    out = capsys.readouterr().out
    results = sorted(str(p.relative_to(tmp_path / "results")) for p in (tmp_path / "results").rglob("*.json"))
    assert results == ["in-distribution/reste-seed0.json", "in-distribution/ste-seed0.json",
                       "target-mnist_m/reste-seed0.json", "target-mnist_m/ste-seed0.json"]
    reste = json.loads((tmp_path / "results" / "target-mnist_m" / "reste-seed0.json").read_text())
    ste = json.loads((tmp_path / "results" / "target-mnist_m" / "ste-seed0.json").read_text())
    assert reste["estimator"]["o"] == [1.0, 3.0] and ste["estimator"]["o"] == [1.0, 1.0]  # o reaches 3
    assert reste["full_precision"] == ste["full_precision"]  # the same FP start
    assert reste["target_domain"] == "mnist_m" and "--method reste" in reste["command"]
    assert "| in-distribution | 1 | source_val_accuracy |" in out
    assert (tmp_path / "results" / "curves.png").read_bytes()[:4] == b"\x89PNG"
    binary_bench.main(common)
    assert "exit 0" not in capsys.readouterr().out  # all four skipped


def test_disorder_summary_reads_the_grid_results(tmp_path):
    checks = 6  # disorder falls 0.6 -> 0.1 over the checks; conflict is highest in the lowest layers
    disorder = [[0.6 - 0.1 * c] * 6 for c in range(checks)]
    conflict = [[0.5, 0.5, 0.3, 0.3, 0.1, 0.1] for _ in range(checks)]
    for target in ("mnist", "syn"):
        path = tmp_path / target / "seed0" / "w3-gaqat.json"
        path.parent.mkdir(parents=True)
        path.write_text(json.dumps({"gaqat": {"disorder": disorder, "conflict": conflict, "frozen_fraction": 0.05}}))
    gaqat_disorder.main(["--results", str(tmp_path)])
    found = gaqat_disorder.collect(tmp_path)["w3-gaqat"]["syn/seed0"]
    assert found["disorder_first_third"] == pytest.approx(0.55) and found["disorder_last_third"] == pytest.approx(0.15)
    assert (found["conflict_lower"], found["conflict_middle"], found["conflict_upper"]) == pytest.approx((0.5, 0.3, 0.1))
    table = (tmp_path / "disorder.md").read_text()
    assert "| w3-gaqat | 2 | 0.550 [0.550, 0.550] | 0.150 [0.150, 0.150] | 0.350 [0.350, 0.350] |" in table
    for png in ("disorder.png", "disorder-w3-gaqat-disorder.png", "disorder-w3-gaqat-conflict.png"):
        assert (tmp_path / png).read_bytes()[:4] == b"\x89PNG"
    runs = gaqat_disorder.collect(tmp_path)["w3-gaqat"]
    assert gaqat_disorder.mean_over_pairs(runs, "conflict")[0] == pytest.approx(conflict[0])
    assert gaqat_disorder.mean_over_pairs(runs, "disorder_curve") == pytest.approx([0.6 - 0.1 * c for c in range(checks)])


def test_summary_compares_each_rule_with_sagm_the_default_rule_and_fp():
    names = ["fp32-sagm", "w3-sagm", "w3-gaqat", "w3-gaqat-layer", "w3-lsq", "w4-sagm", "w4-gaqat", "w4-lsq"]
    pairs = gaqat_grid.comparisons(names)
    assert ("w3-gaqat-layer", "w3-sagm") in pairs and ("w3-gaqat-layer", "w3-gaqat") in pairs
    assert ("w4-gaqat", "fp32-sagm") in pairs and ("w3-gaqat", "fp32-sagm") not in pairs
    assert ("w3-gaqat", "w3-gaqat") not in pairs
    assert {("fp32-sagm", "w3-sagm"), ("fp32-sagm", "w4-sagm"), ("w3-sagm", "w3-lsq"), ("w4-sagm", "w4-lsq")} <= set(pairs)
    table = {"w3-gaqat": {("mnist", 0): 50.0, ("syn", 0): 40.0}, "w3-sagm": {("mnist", 0): 49.0, ("syn", 0): 38.0}}
    args = SimpleNamespace(targets=["mnist", "syn"], seeds=[0])
    assert "| w3-gaqat − w3-sagm | 2 | +1.50 |" in gaqat_grid.summarize(args, table, None, None)


def test_t_interval_matches_the_t_table():
    from run_results import t_interval

    mean, low, high = t_interval([1.0, 2.0, 3.0])  # sd 1, n 3: half-width t(0.975, 2) / sqrt(3) = 4.3027 / 1.7321
    assert mean == 2.0 and (low, high) == pytest.approx((2.0 - 2.4841, 2.0 + 2.4841), abs=1e-4)
    assert t_interval([0.5])[0] == 0.5 and all(v != v for v in t_interval([0.5])[1:])  # one pair: no interval (NaN)
