"""The convergence record: the rule on constructed curves, the curves both phases of a real
``qtool quantize`` write into report.json and convergence.png, and the pre-training cache key
(settings only, so another checkout reuses a start)."""

import json
from pathlib import Path
from types import SimpleNamespace
from dataclasses import replace

import pytest

from qtool.options import QuantizeOptions
from qtool.train.convergence import convergence, last_third_gain


def points(*values, every=10):
    return [{"step": every * (i + 1), "val": v / 100} for i, v in enumerate(values)]


@pytest.mark.parametrize("values, gain, converged", [
    ((50, 70, 80, 85, 86, 86.2, 86.3, 86.1, 86.4), 0.2, True),  # flat last third
    ((50, 60, 70, 75, 78, 80, 82, 84, 86), 6.0, False),  # still rising
    ((50, 70, 80, 85, 88, 86, 87, 85, 84), -1.0, True),  # falling after a peak before the last third
    ((50, 70, 80, 85, 86, 86, 90, 87, 86), 4.0, False),  # a rise inside the last third counts, though it fell back
])
def test_the_last_third_must_gain_less_than_half_a_point(values, gain, converged):
    assert last_third_gain(points(*values)) == pytest.approx(gain)
    assert convergence([{**p, "loss": 0.0} for p in points(*values)], {"steps": 90})["converged"] is converged


def test_the_last_third_is_cut_by_step_not_by_count():
    # evaluations at 10, 20, 30, 60, 90: after 2/3 of step 90 only the last one counts
    curve = [{"step": s, "val": v / 100} for s, v in [(10, 40), (20, 50), (30, 60), (60, 80), (90, 80.3)]]
    assert last_third_gain(curve) == pytest.approx(0.3)


def test_too_few_evaluations_give_no_verdict():
    record = convergence([{"step": 5, "val": 0.5}, {"step": 10, "val": 0.6}], {"steps": 10})
    assert record["converged"] is None and record["last_third_gain"] is None
    assert convergence([{"step": 5, "loss": 1.0}], {})["curve"] == []  # steps without an evaluation are no points


def test_quantize_report_carries_both_curves_and_the_plot(tmp_path, capsys):
    from qtool.cli import main

    out = tmp_path / "run"
    main(["quantize", "dg-cnn", "--target-domain", "0", "--bits", "4", "--method", "lsq", "--steps", "6",
          "--pretrain-epochs", "0.3", "--batch-size", "32", "--evals", "3", "--threads", "1",
          "--cache-dir", str(tmp_path / "cache"), "--out", str(out)])
    report = json.loads((out / "report.json").read_text())
    record = report["convergence"]
    assert "last third" in record["rule"]
    qat, pretrain = record["qat"], record["pretrain"]
    assert [p["step"] for p in qat["curve"]] == [2, 4, 6] and qat["budget"]["steps"] == 6
    assert qat["budget"]["evals"] == 3 and qat["budget"]["batch_size"] == 30  # 32 split over 3 sources
    assert len(pretrain["curve"]) == 3 and pretrain["budget"]["epochs"] == pytest.approx(0.3, abs=0.02)
    for phase in (qat, pretrain):
        assert isinstance(phase["converged"], bool)
        assert phase["converged"] == (phase["last_third_gain"] < 0.5)
        for point in phase["curve"]:
            assert set(point["per_domain"]) == set(report["source_domains"])
            assert point["val"] == pytest.approx(sum(point["per_domain"].values()) / len(point["per_domain"]))
    # the QAT curve is the history model selection used
    assert max(p["val"] for p in qat["curve"]) == pytest.approx(max(r["val"] for r in report["history"]))
    assert (out / "convergence.png").read_bytes()[:4] == b"\x89PNG"
    assert report["full_precision"]["convergence"] == pretrain  # the cache keeps the start's curve
    printed = capsys.readouterr().out
    for phase in ("pretrain", "qat"):  # the summary tells the user each phase's verdict
        assert f"{phase}: " + ("converged" if record[phase]["converged"] else "NOT converged") in printed


def test_pretrain_cache_key_depends_on_pretraining_settings_only():
    from qtool.data import load_domains
    from qtool.pipeline import pretrain_key

    data = load_domains("rotated-digits")
    base = QuantizeOptions(model="resnet20", out="a", target_domain="0", pretrain_epochs=10)
    key = pretrain_key(base, data)
    same = [replace(base, out="b", bits=3, method="gaqat", lr=1e-4, epochs=2, cache_dir="/elsewhere", threads=4,
                    device="cpu", method_options={"tau": 0.3}, resume="x"),
            replace(base, pretrain_epochs=10.0)]
    assert all(pretrain_key(options, data) == key for options in same)
    different = [replace(base, pretrain_lr=3e-3), replace(base, seed=1), replace(base, target_domain="15"),
                 replace(base, pretrain_method="sagm"), replace(base, augment=False), replace(base, evals=3)]
    assert len({pretrain_key(options, data) for options in different} | {key}) == len(different) + 1


def test_pretrain_key_ignores_the_qtool_version(monkeypatch):
    import qtool.pipeline as pipeline
    from qtool.data import load_domains

    data = load_domains("rotated-digits")
    options = QuantizeOptions(model="resnet20", out="a", target_domain="0")
    key = pipeline.pretrain_key(options, data)
    monkeypatch.setattr(pipeline, "__version__", "99.0")
    assert pipeline.pretrain_key(options, data) == key


def test_pretrain_key_follows_the_archive_content_not_its_path_or_time(tmp_path):
    """A data archive that is re-created (a new session's copy, a moved file) keeps the cached
    starts; an archive with other content does not."""
    import os
    import shutil

    from qtool.pipeline import pretrain_key
    from reliability_helpers import write_tiny_npz

    first = Path(write_tiny_npz(tmp_path / "a.npz"))
    copy = tmp_path / "elsewhere" / "a.npz"
    copy.parent.mkdir()
    shutil.copyfile(first, copy)
    os.utime(copy, ns=(1, 1))
    data = SimpleNamespace(image_size=32)
    key = pretrain_key(QuantizeOptions(model="resnet20", out="x", data=str(first)), data)
    assert pretrain_key(QuantizeOptions(model="resnet20", out="x", data=str(copy)), data) == key
    with open(copy, "ab") as handle:  # other bytes: another start
        handle.write(b"\0")
    assert pretrain_key(QuantizeOptions(model="resnet20", out="x", data=str(copy)), data) != key


def test_the_quantize_summary_says_which_phases_converged():
    from qtool.progress import convergence_lines

    phases = {"rule": "…", "pretrain": {"converged": True, "last_third_gain": 0.213},
              "qat": {"converged": False, "last_third_gain": 1.337}}
    assert convergence_lines(phases) == [
        "pretrain: converged (last third +0.21 pts)",
        "qat: NOT converged (last third +1.34 pts); the curve still rises (rule: under 0.5): a larger --epochs may gain more"]
    assert convergence_lines({"qat": {"converged": None, "last_third_gain": None}}) == ["qat: too few evaluations"]
    assert convergence_lines({"qat": {"converged": True, "last_third_gain": -0.4}}) == ["qat: converged (last third -0.40 pts)"]
