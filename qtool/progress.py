"""What the CLI shows: a progress bar while training and rich summary tables after.

Uses ``rich`` (already a dependency of the bench tables): live bars with loss/accuracy that
degrade to plain lines when stderr is not a terminal, and tables that align themselves.
"""

from __future__ import annotations

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

console = Console(stderr=True)
stdout = Console()


class TrainingProgress:
    """Receives the trainer's records (``{"phase", "step", "loss", "acc", "val"}``) and draws them."""

    def __init__(self, enabled: bool = True):
        """``enabled=False`` draws nothing (data-parallel ranks other than 0)."""
        self.progress = Progress(
            TextColumn("[bold]{task.description:<9}"), BarColumn(), MofNCompleteColumn(),
            TextColumn("loss {task.fields[loss]:.3f}  acc {task.fields[acc]:.3f}  val {task.fields[val]}"),
            TimeElapsedColumn(), TimeRemainingColumn(), console=console, transient=False, disable=not enabled,
        )
        self.tasks: dict[str, int] = {}

    def __enter__(self):
        self.progress.__enter__()
        return self

    def __exit__(self, *exc):
        return self.progress.__exit__(*exc)

    def update(self, record: dict) -> None:
        phase = record.get("phase", "train")
        if "cached" in record:
            console.print(f"full-precision model from cache: {record['cached']}")
            return
        if "total" in record:
            self.tasks[phase] = self.progress.add_task(phase, total=record["total"], loss=0.0, acc=0.0, val="-")
            return
        task = self.tasks.get(phase)
        if task is None:
            return
        fields = {"loss": record.get("loss", 0.0), "acc": record.get("acc", 0.0)}
        if "val" in record:
            fields["val"] = f"{record['val']:.3f}"
        self.progress.update(task, completed=record.get("step", 0), **fields)


def _pct(value) -> str:
    return "-" if value is None else f"{100 * value:.2f}"


def print_quantize_summary(report: dict, out: str) -> None:
    fp = report.get("full_precision", {})
    table = Table(title=f"{report['model']} W{report['bits']}A{report['act_bits']} {report['method']} (seed {report['seed']})")
    table.add_column("domain")
    table.add_column("role")
    table.add_column("full precision %", justify="right")
    table.add_column("quantized %", justify="right")
    for name, acc in report["accuracy"].items():
        role = "target" if name == report["target_domain"] else "source (val)"
        table.add_row(name, role, _pct(fp.get("accuracy", {}).get(name)), _pct(acc))
    table.add_row("mean source val", "", _pct(fp.get("source_val_accuracy")), _pct(report["source_val_accuracy"]))
    stdout.print(table)
    stdout.print(f"{report['steps']} QAT steps in {report['seconds']:.0f} s; wrote {out}/model.pt and {out}/report.json")
    for line in convergence_lines(report.get("convergence", {})):
        stdout.print(line)


# the flag that gives each phase a longer budget
BUDGET_FLAGS = {"pretrain": "--pretrain-epochs", "qat": "--epochs"}


def convergence_lines(phases: dict) -> list[str]:
    """One line per training phase: its convergence verdict, and for a curve still rising, the flag
    that lengthens it (accuracy from such a run understates what the method reaches)."""
    from qtool.train.convergence import GAIN_POINTS, verdict

    lines = []
    for phase, entry in phases.items():
        if phase not in BUDGET_FLAGS:
            continue  # "rule": the text of the rule, not a phase
        line = f"{phase}: {verdict(entry)}"
        if entry.get("converged") is False:
            line += f"; the curve still rises (rule: under {GAIN_POINTS:g}): a larger {BUDGET_FLAGS[phase]} may gain more"
        lines.append(line)
    return lines


def print_eval_summary(report: dict) -> None:
    table = Table(title=f"{report['model']} on {', '.join(report['accuracy'])}")
    table.add_column("domain")
    table.add_column("role")
    table.add_column("accuracy %", justify="right")
    for name, acc in report["accuracy"].items():
        table.add_row(name, "target" if name == report["target_domain"] else "source (val)", _pct(acc))
    stdout.print(table)


def print_export_summary(result, verify_domain: str | None) -> None:
    """What the export wrote, what onnxruntime will run, and how well it matches PyTorch."""
    from qtool.onnxrt import float_layers, integer_layers

    def ops(counts: dict) -> str:
        return ", ".join(f"{op}×{n}" for op, n in sorted(counts.items(), key=lambda kv: -kv[1])) or "-"

    table = Table(title=f"{result.path}: {result.bytes / 1024:.1f} KiB, opset {result.opset}, {result.weight_storage} weights")
    table.add_column("")
    table.add_column("")
    table.add_row("quantized layers", f"{result.quantized_layers} (float layers: {result.float_layers})")
    table.add_row("onnxruntime integer kernels", ops(integer_layers(result.ops)))
    table.add_row("onnxruntime float compute", ops(float_layers(result.ops)))
    table.add_row("numerics", result.numerics + (f" ({result.numerics_note})" if result.numerics_note else ""))
    table.add_row("approximations", f"{len(result.notes)} tensors float in PyTorch, 8-bit in ONNX" if result.notes else "none")
    verification = result.verification
    if verification is not None:
        table.add_row(f"verified on {verify_domain}", verification.summary(emulated=False))
        for other in verification.emulated:
            table.add_row(f"verified on {verify_domain}, emulated CPU", other.cpu_summary())
        table.add_row("onnxruntime, optimizations off",
                      f"agreement {100 * verification.reference_agreement:.2f}%, "
                      f"max |logit difference| {verification.reference_max_abs_diff:.4g}")
    stdout.print(table)
