"""The ``qtool`` command line: parse, call one function, print. No training logic here.

A user's mistake (``QtoolError``) becomes one ``error: ...`` line on stderr and exit code 2.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click

from qtool.emulated_cpu import CPUS as EMULATED_CPUS
from qtool.errors import QtoolError
from qtool.options import default

CONTEXT = {"help_option_names": ["-h", "--help"], "max_content_width": 100}


def _load_config(ctx: click.Context, param: click.Parameter, value: str | None):
    """``--config FILE.yaml``: its keys become the defaults of the other options (flags win)."""
    if value is None:
        return None
    import yaml

    try:
        data = yaml.safe_load(Path(value).read_text()) or {}
    except (OSError, yaml.YAMLError) as exc:
        raise click.BadParameter(f"cannot read {value}: {str(exc).splitlines()[0]}") from None
    if not isinstance(data, dict):
        raise click.BadParameter(f"{value} must hold a mapping of option names to values")
    data = {str(key).replace("-", "_"): item for key, item in data.items()}
    known = {p.name for p in ctx.command.params}
    unknown = sorted(set(data) - known)
    if unknown:
        raise click.BadParameter(f"{value}: unknown keys {', '.join(unknown)}")
    if isinstance(data.get("option"), dict):  # `option: {tau: 0.1}` reads more naturally in YAML
        data["option"] = [f"{k}={v}" for k, v in data["option"].items()]
    ctx.default_map = {**(ctx.default_map or {}), **data}
    return value


def _parse_options(values: tuple[str, ...]) -> dict:
    import yaml

    parsed = {}
    for item in values:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise QtoolError(f"--option expects KEY=VALUE, got {item!r}")
        parsed[key.strip().replace("-", "_")] = yaml.safe_load(raw)
    return parsed


@click.group(context_settings=CONTEXT)
@click.version_option(package_name="qtool")
def cli():
    """qtool: quantization-aware training that generalizes to unseen domains, low-bit kernels,
    and ONNX export that onnxruntime runs as integer kernels on edge CPUs."""


@cli.command(context_settings=CONTEXT)
@click.option("--config", type=click.Path(dir_okay=False), callback=_load_config, is_eager=True, expose_value=False,
              help="YAML file whose keys set defaults for these options (command-line flags override it).")
@click.argument("model", required=False)
@click.option("--data", default=default("data"), show_default=True,
              help="'rotated-digits', a multi-domain .npz archive, or a DomainBed image folder.")
@click.option("--target-domain", default=None, help="Held-out domain (leave-one-domain-out). Default: none, all domains are sources.")
@click.option("--bits", type=int, default=default("bits"), show_default=True, help="Weight bits: 1 (binary), 2, 3, 4, 8; 32 trains full precision.")
@click.option("--act-bits", type=int, default=None, help="Activation bits. Default: same as --bits.")
@click.option("--method", default=default("method"), show_default=True,
              help="lsq | sam | gsam | sagm | gaqat (2-8 bits); ste | reste (binary).")
@click.option("--epochs", type=float, default=default("epochs"), show_default=True, help="QAT epochs over the source training images.")
@click.option("--steps", type=int, default=None, help="QAT steps (overrides --epochs).")
@click.option("--pretrain-epochs", type=float, default=default("pretrain_epochs"), show_default=True,
              help="Full-precision pre-training epochs for a zoo model (cached and reused).")
@click.option("--pretrain-method", default=default("pretrain_method"), show_default=True, help="Optimizer for pre-training: plain | sam | gsam | sagm.")
@click.option("--seed", type=int, default=default("seed"), show_default=True, help="Seed for the split, the batch order, augmentation and init.")
@click.option("--batch-size", type=int, default=default("batch_size"), show_default=True, help="Images per step, split evenly over source domains.")
@click.option("--lr", type=float, default=default("lr"), show_default=True, help="Adam learning rate for QAT (cosine decay).")
@click.option("--pretrain-lr", type=float, default=default("pretrain_lr"), show_default=True, help="Adam learning rate for pre-training.")
@click.option("--weight-decay", type=float, default=default("weight_decay"), show_default=True, help="Adam weight decay.")
@click.option("--rho", type=float, default=default("rho"), show_default=True, help="Perturbation radius of SAM/GSAM/SAGM.")
@click.option("--alpha", type=float, default=None, help="GSAM's alpha (default 0.1) or SAGM's alpha (default 0.001).")
@click.option("--first-last-bits", type=int, default=default("first_last_bits"), show_default=True,
              help="Bits for the first conv and the last classifier; 0 keeps them in float.")
@click.option("--image-size", type=int, default=None, help="Resize images to this size (default: the data's size; 28 for rotated-digits).")
@click.option("--holdout", type=float, default=default("holdout"), show_default=True, help="Fraction of each source domain held out for model selection.")
@click.option("--evals", type=int, default=default("evals"), show_default=True, help="Model-selection evaluations over the run.")
@click.option("--augment/--no-augment", default=default("augment"), show_default=True, help="Random small rotations, zooms and shifts.")
@click.option("--cache/--no-cache", "use_cache", default=True, show_default=True, help="Reuse cached full-precision pre-training.")
@click.option("--cache-dir", type=click.Path(file_okay=False), default=None, help="Pre-training cache (default ~/.cache/qtool/pretrain).")
@click.option("--option", "-O", multiple=True, metavar="KEY=VALUE",
              help="Method option, repeatable (GAQAT: window, every, tau, ...; ReSTE: o_end, t, m).")
@click.option("--threads", type=int, default=None, help="torch threads per process (default: torch's choice).")
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default=default("device"), show_default=True,
              help="Where to train: auto picks CUDA when available.")
@click.option("--nproc", type=int, default=1, show_default=True,
              help="Data-parallel processes on this machine, started with torchrun's launcher "
                   "(same as `torchrun --nproc_per_node N -m qtool quantize ...`).")
@click.option("--checkpoints/--no-checkpoints", default=default("checkpoints"), show_default=True,
              help="Write resumable checkpoints to OUT/checkpoints at each epoch end.")
@click.option("--checkpoint-every", type=int, default=default("checkpoint_every"), show_default=True,
              help="Also checkpoint every N steps (0: epoch ends only).")
@click.option("--resume", type=click.Path(file_okay=False), default=None,
              help="Continue the interrupted run whose --out folder this is, with its options.")
@click.option("--out", type=click.Path(file_okay=False), default=None,
              help="Output folder for model.pt and report.json (required unless --resume).")
def quantize(model, threads, nproc, option, **kwargs):
    """Train MODEL (a zoo name or a full-precision qtool checkpoint) with quantization-aware
    training on the source domains and write DIR/model.pt and DIR/report.json."""
    from qtool.options import QuantizeOptions
    from qtool.pipeline import quantize as run_quantize, validate
    from qtool.progress import TrainingProgress, print_quantize_summary
    from qtool.runs import resumed_options
    from qtool.launch import launched_by_torchrun, launched_rank

    resume = kwargs["resume"]
    if model is None and not resume:
        raise QtoolError("missing MODEL: a zoo name (resnet20, resnet18, vgg-small, dg-cnn, mobilenetv2) or a checkpoint")
    if kwargs["out"] is None and not resume:
        raise QtoolError("missing --out DIR: the folder for model.pt and report.json")
    if nproc < 1:
        raise QtoolError(f"--nproc must be at least 1, got {nproc}")
    first_last = kwargs.pop("first_last_bits")
    options = QuantizeOptions(model=model or "", first_last_bits=None if first_last == 0 else first_last, threads=threads,
                              method_options=_parse_options(option), **{**kwargs, "out": kwargs["out"] or ""})
    explicit = _explicit_options(click.get_current_context(), model)
    if nproc > 1 and not launched_by_torchrun():
        from qtool.launch import run_data_parallel

        # Check everything here so a mistake is one line, not one per worker plus torchrun's report.
        validate(resumed_options(options, explicit) if resume else options)
        sys.exit(run_data_parallel(nproc, _without_nproc(click.get_current_context().obj["argv"]), threads))
    main_rank = launched_rank() == 0
    with TrainingProgress(enabled=main_rank) as progress:
        report = run_quantize(options, progress.update, explicit)
    if main_rank:
        print_quantize_summary(report, options.out or resume)


@cli.command("eval", context_settings=CONTEXT)
@click.argument("checkpoint", type=click.Path())
@click.option("--data", default="rotated-digits", show_default=True, help="Data to evaluate on (same formats as quantize).")
@click.option("--target-domain", default=None, help="Held-out domain; default: the one the checkpoint was trained with.")
@click.option("--json", "json_path", type=click.Path(dir_okay=False), default=None, help="Write the accuracies as JSON here.")
@click.option("--threads", type=int, default=None, help="torch threads (default: torch's choice).")
def eval_command(checkpoint, data, target_domain, json_path, threads):
    """Top-1 accuracy of CHECKPOINT on every domain of --data."""
    from qtool.pipeline import evaluate_checkpoint
    from qtool.progress import print_eval_summary

    _set_threads(threads)
    report = evaluate_checkpoint(checkpoint, data, target_domain)
    if json_path:
        _write_json(json_path, report)
    print_eval_summary(report)


@cli.command("export", context_settings=CONTEXT)
@click.argument("source")
@click.option("-o", "--out", required=True, type=click.Path(), help="Output .onnx file (written only if every check passes).")
@click.option("--verify", type=int, default=0, show_default=True,
              help="Compare onnxruntime with PyTorch on N held-out images; fail below 99.5% top-1 agreement.")
@click.option("--verify-cpu", multiple=True, type=click.Choice(list(EMULATED_CPUS)),
              help="Repeat --verify as onnxruntime runs on this CPU, emulated by qemu-user (repeatable). avx2: "
                   "x86 without VNNI, whose int16 pair sums a VNNI machine never exercises; neon, neondot, i8mm: "
                   "ARM without and with the dot product and int8 matrix multiply (needs `python -m "
                   "qtool.arm_sysroot` once).")
@click.option("--data", default=None, help="Images for calibration and --verify (default: the data the checkpoint was trained on).")
@click.option("--target-domain", default=None, help="Domain to verify on (default: the checkpoint's held-out domain).")
@click.option("--weight-storage", type=click.Choice(["int8", "int4"]), default="int8", show_default=True,
              help="int4: opset-21 INT4 initializers, half the file; onnxruntime unpacks them to int8 at load.")
@click.option("--numerics", type=click.Choice(["faithful", "fast"]), default="faithful", show_default=True,
              help="faithful: the graph computes the trained model; for a graph-prepared model (qtool's default) "
                   "every layer is a fused integer kernel, for a layer-swapped one (a model torch.fx could not "
                   "trace) its float residual sums and biases stay float (ConvInteger). fast: for such a model, "
                   "fuse everything anyway by putting those float tensors on calibrated 8-bit grids: faster, but "
                   "not the trained model's numbers (a graph-prepared model exports the same either way).")
@click.option("--opset", type=int, default=None, help="ONNX opset (default 17; 21 with --weight-storage int4).")
@click.option("--calibration", type=int, default=512, show_default=True,
              help="Source-domain images used to calibrate the tensors the model leaves in float (residual sums).")
@click.option("--weights", type=click.Path(dir_okay=False), default=None, help="State dict for a SOURCE given as FILE.py:FUNCTION.")
@click.option("--input-shape", default=None, help="C,H,W for a SOURCE given as FILE.py:FUNCTION (e.g. 3,32,32).")
@click.option("--threads", type=int, default=1, show_default=True, help="onnxruntime threads for the checks.")
@click.option("--json", "json_path", type=click.Path(dir_okay=False), default=None, help="Write the export report as JSON here.")
def export_command(source, out, json_path, input_shape, **kwargs):
    """Export SOURCE (a qtool checkpoint, or FILE.py:FUNCTION returning a qtool/Brevitas model)
    to ONNX that onnxruntime runs as integer kernels (QLinearConv, QGemm, QLinearAdd)."""
    from qtool.exporters.from_checkpoint import ExportOptions, export_source
    from qtool.progress import print_export_summary

    shape = _parse_shape(input_shape) if input_shape else None
    result, domain = export_source(ExportOptions(source=source, out=out, input_shape=shape, **kwargs))
    if json_path:
        _write_json(json_path, result.to_dict())
    print_export_summary(result, domain)


@cli.command(context_settings=CONTEXT)
@click.argument("model", required=False, type=click.Path(dir_okay=False))
@click.option("--against", multiple=True, type=click.Path(dir_okay=False), help="Another .onnx to time side by side (repeatable).")
@click.option("--threads", type=int, default=1, show_default=True, help="onnxruntime intra-op threads (torch threads with --kernels / --backend kernels).")
@click.option("--runs", type=int, default=200, show_default=True, help="Timed runs per model (interleaved across models).")
@click.option("--warmup", type=int, default=20, show_default=True, help="Untimed runs per model first.")
@click.option("--batch", type=int, default=1, show_default=True, help="Batch size of the random input.")
@click.option("--backend", type=click.Choice(["onnxruntime", "kernels"]), default="onnxruntime", show_default=True,
              help="'kernels': MODEL is a qtool checkpoint (.pt), run on qtool's low-bit kernels against the same network in fp32 PyTorch.")
@click.option("--kernels", "kernel_suite", is_flag=True, help="Benchmark the low-bit kernels on real layer shapes against fp32 torch (no MODEL).")
@click.option("--quick", is_flag=True, help="With --kernels: fewer shapes and repeats (a smoke run).")
@click.option("--json", "json_path", type=click.Path(dir_okay=False), default=None, help="Write the results as JSON here.")
def bench(model, against, threads, runs, warmup, batch, backend, kernel_suite, quick, json_path):
    """Latency (median, p90), file size and the kernels onnxruntime ran for MODEL.onnx and each
    --against model, with ratios to MODEL. Needs only onnxruntime and numpy (no torch).

    With --kernels, or --backend kernels on a checkpoint, it times qtool's own low-bit kernels
    in PyTorch instead (needs the train extra)."""
    if threads < 1:
        raise QtoolError("--threads must be at least 1")
    if kernel_suite:
        if model is not None or against:
            raise QtoolError("--kernels benchmarks the kernels on fixed layer shapes; it takes no MODEL")
        result = _torch_bench().kernel_suite(threads, quick)
    elif backend == "kernels":
        if model is None or against:
            raise QtoolError("--backend kernels takes one qtool checkpoint MODEL.pt and no --against")
        result = _torch_bench().checkpoint_on_kernels(model, threads, batch, runs)
    else:
        from qtool.bench import BenchConfig, bench_models, print_bench

        if model is None:
            raise QtoolError("missing MODEL.onnx (or pass --kernels)")
        result = bench_models([model, *against], BenchConfig(threads=threads, runs=runs, warmup=warmup, batch=batch))
        print_bench(result)
    if json_path:
        _write_json(json_path, result)


def _torch_bench():
    """The torch side of ``bench``, imported only when asked for (the edge install has no torch)."""
    try:
        from qtool.lowbit import bench_cli
    except ImportError as exc:
        raise QtoolError(f"{exc.name or 'torch'} is not installed; this mode needs `pip install qtool[train]`") from None
    return bench_cli


def _write_json(path: str, data: dict) -> None:
    from qtool.atomic import write_text_atomic

    try:
        write_text_atomic(path, json.dumps(data, indent=2))
    except OSError as exc:
        raise QtoolError(f"cannot write {path}: {exc.strerror or exc}") from None


def _parse_shape(text: str) -> tuple[int, ...]:
    try:
        shape = tuple(int(part) for part in text.split(","))
    except ValueError:
        raise QtoolError(f"--input-shape expects C,H,W integers, got {text!r}") from None
    if len(shape) != 3 or min(shape) < 1:
        raise QtoolError(f"--input-shape expects three positive integers C,H,W, got {text!r}")
    return shape


@cli.command("build-kernels", context_settings=CONTEXT)
@click.option("--verbose", "-v", is_flag=True, help="Show the compiler's output.")
def build_kernels_command(verbose):
    """Compile the op library (low-bit kernels and the fused training ops) into the cache now
    (otherwise the first use compiles it)."""
    from qtool.native.build import build_kernels

    try:
        path = build_kernels(verbose=verbose)
    except Exception as exc:  # noqa: BLE001 - a compiler failure is reported, not a traceback
        raise QtoolError(f"kernel build failed: {str(exc).strip().splitlines()[0][:300]}") from None
    click.echo(f"qtool op library: {path}")


def _explicit_options(ctx: click.Context, model: str | None) -> set[str]:
    """Names of the QuantizeOptions the user gave (flags or --config), for --resume's checks."""
    given = {name for name in ctx.params
             if ctx.get_parameter_source(name) not in (None, click.core.ParameterSource.DEFAULT)}
    renamed = {"option": "method_options"}
    explicit = {renamed.get(name, name) for name in given} - {"nproc", "config"}
    return explicit | ({"model"} if model else set())


def _without_nproc(argv: list[str]) -> list[str]:
    """The command line minus ``--nproc N``: what each torchrun worker runs."""
    kept, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg == "--nproc":
            skip = True
        elif not arg.startswith("--nproc="):
            kept.append(arg)
    return kept


def _set_threads(threads: int | None) -> None:
    if threads is None:
        return
    if threads < 1:
        raise QtoolError(f"--threads must be at least 1, got {threads}")
    import torch

    torch.set_num_threads(threads)


def _fail(message: str, code: int) -> None:
    """One ``error: ...`` line; under torchrun, ranks other than 0 say which rank they are."""
    from qtool.launch import launched_rank

    rank = launched_rank()
    print(f"{f'[rank {rank}] ' if rank else ''}error: {message}", file=sys.stderr)
    sys.exit(code)


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        cli.main(args=argv, prog_name="qtool", standalone_mode=False, obj={"argv": argv})
    except click.exceptions.Abort:
        _fail("aborted", 130)
    except click.ClickException as exc:  # usage mistakes are one line too (`qtool CMD -h` shows usage)
        _fail(exc.format_message(), exc.exit_code)
    except QtoolError as exc:
        _fail(str(exc), 2)
    except FloatingPointError as exc:  # divergence: the user's hyper-parameters, not a bug
        _fail(str(exc), 3)
    except ModuleNotFoundError as exc:
        if exc.name in ("torch", "brevitas", "onnx", "sklearn", "yaml", "matplotlib"):
            _fail(f"{exc.name} is not installed; this command needs `pip install qtool[train]`", 2)
        raise


if __name__ == "__main__":
    main()
