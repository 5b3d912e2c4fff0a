"""Comments tell the truth about the repository: every file a source comment or docstring cites
exists, and no figure goes through pyplot."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SOURCE_FOLDERS = ("qtool", "kernels", "exporters", "models")  # not benchmarks/: they name results they write
# A cited path starts with a folder of the repository (or of kernels/, as the C++ comments
# write them), or with ../shared/, the shared folder next to the checkout.
CITED = re.compile(r"(?<![\w/.-])((?:\.\./shared/|(?:docs|kernels|qtool|exporters|models|benchmarks|tests|cpu|cuda)/)"
                   r"(?:[\w-]+/)*[\w-]+\.(?:md|py|cpp|h|cu|cuh|json))")


def cited_paths():
    for folder in SOURCE_FOLDERS:
        for source in sorted((REPO / folder).rglob("*")):
            if source.suffix not in (".py", ".cpp", ".h", ".cu", ".cuh"):
                continue
            for number, line in enumerate(source.read_text().splitlines(), 1):
                if not line.lstrip().startswith("#include"):
                    for match in CITED.finditer(line):
                        yield source, number, match.group(1)


def test_every_cited_file_exists():
    # ../shared/ is checked where the checkout has the shared folder beside it (a clone elsewhere has none)
    shared_here = (REPO.parent / "shared").is_dir()
    missing = [f"{source.relative_to(REPO)}:{number}: {path}" for source, number, path in cited_paths()
               if (shared_here or not path.startswith("../shared/"))
               and not any((root / path).exists() for root in (REPO, REPO / "kernels", source.parent))]
    assert not missing, "comments cite files that do not exist:\n" + "\n".join(missing)


ESTIMATOR_PLOT = """
import sys
from pathlib import Path
from qtool.quant.binary import BinaryConv2d
from qtool.train.binary import EstimatorSchedule
schedule = EstimatorSchedule([BinaryConv2d(2, 2, 3)], "reste", 3.0)
schedule.history = {"o": [1.0, 2.0], "estimating_error": [0.5, 0.4], "estimating_error_o_end": [0.9, 0.6],
                    "gradient_stability": [1e-3, 2e-4]}
schedule.write_artifacts(sys.argv[1])
assert Path(sys.argv[1], "estimator.png").read_bytes()[:4] == b"\\x89PNG"
print("matplotlib.pyplot" in sys.modules)
"""


def test_the_estimator_plot_does_not_use_pyplot(tmp_path):
    result = subprocess.run([sys.executable, "-c", ESTIMATOR_PLOT, str(tmp_path)], capture_output=True, text=True,
                            timeout=300, env={**os.environ, "QTOOL_KERNELS": "reference"})
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "False"
