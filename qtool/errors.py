"""Which exception qtool raises for what, and what the command line makes of it.

The rule:

1. **A mistake in what the user asked for** raises ``QtoolError`` (or a subclass), worded so the
   user can fix it, wherever in the library the check happens to live: a flag or ``-O`` option,
   a model or method name, a data set, a checkpoint (missing, corrupt, foreign, a plan that does
   not fit its architecture), an ONNX file, an output path, an export request. The CLI prints
   it as one ``error: ...`` line and exits 2. Subclasses say where it came from when a caller
   may want to tell them apart: ``InputError`` (a bad value), ``qtool.exporters.adapters.ExportError``
   and ``qtool.exporters.verify.VerificationError``.
2. **A bug, or code calling the Python API wrongly** (a wrong type, a value the CLI validates
   before the call, a broken internal invariant) raises ``ValueError``/``TypeError``/
   ``RuntimeError`` and keeps its traceback: the CLI never shortens those, so a bug stays visible.
   The compiled ops' argument checks (``TORCH_CHECK``) raise ``RuntimeError``, torch's convention.
3. **Training that diverges** (a NaN/Inf loss or parameter) raises
   ``qtool.train.guard.DivergenceError``, a ``FloatingPointError``: one line, exit 3.

When a check that is reachable from the command line must also serve API callers that catch
``ValueError``, it raises ``InputError``, which is both.
"""


class QtoolError(Exception):
    """A problem with what the user asked for, worded so the user can fix it."""


class InputError(QtoolError, ValueError):
    """A value the user gave (directly, or through a file) that qtool cannot take."""
