"""Starting data-parallel workers: ``qtool quantize --nproc N`` hands its command line to
torchrun's own launcher (``torch.distributed.run``), exactly as if the user had typed
``torchrun --standalone --nproc_per_node N -m qtool quantize ...``.

The environment helpers need no torch, so the CLI can use them on a base install.
"""

from __future__ import annotations

import logging
import os


def launched_rank() -> int:
    """This process's rank as torchrun set it (0 outside torchrun)."""
    return int(os.environ.get("RANK", "0"))


def launched_by_torchrun() -> bool:
    return "LOCAL_RANK" in os.environ and "WORLD_SIZE" in os.environ


def run_data_parallel(nproc: int, qtool_args: list[str], threads: int | None = None) -> int:
    """Run ``qtool <qtool_args>`` in ``nproc`` local processes; the exit code of the first
    failing worker, or 0. Workers print their own one-line errors."""
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import parse_args, run

    # torchrun would set 1 thread per worker and warn about it; split the cores instead
    # (--threads, passed on to every worker, still wins).
    os.environ.setdefault("OMP_NUM_THREADS", str(threads or max(1, (os.cpu_count() or 1) // nproc)))
    # The agent's failure report repeats what the worker already said, as a multi-line table.
    logging.getLogger("torch.distributed.elastic").setLevel(logging.CRITICAL)
    try:
        run(parse_args(["--standalone", f"--nproc_per_node={nproc}", "-m", "qtool", *qtool_args]))
    except ChildFailedError as failure:
        _, first = failure.get_first_failure()
        return first.exitcode if first.exitcode > 0 else 1
    return 0
