"""`import chainfree` and `chainfree --help` stay light: no torch (or other heavy optional part) is
imported, and the time they cost is under 1 s of CPU time (process time of the interpreter, best of three
runs: wall time on a shared machine also counts the time other processes hold the cores)."""

import subprocess
import sys

import pytest

PROBE = r"""
import io, sys, time, contextlib
t0 = time.process_time()
{body}
dt = time.process_time() - t0
heavy = sorted(m for m in ("torch", "numpy", "triton", "transformers", "matplotlib") if m in sys.modules)
print(dt, ",".join(heavy))
"""

IMPORT = "import chainfree"
HELP = """
from chainfree.cli import app
with contextlib.redirect_stdout(io.StringIO()):
    try:
        app(["--help"], prog_name="chainfree")
    except SystemExit:
        pass
    try:
        app(["train", "--help"], prog_name="chainfree")
    except SystemExit:
        pass
"""


def probe(body: str) -> tuple[float, str]:
    out = subprocess.run([sys.executable, "-c", PROBE.format(body=body)], capture_output=True, text=True,
                         check=True).stdout.split()
    return float(out[0]), out[1] if len(out) > 1 else ""


@pytest.mark.parametrize("body", [IMPORT, HELP], ids=["import chainfree", "chainfree --help"])
def test_light_entry_points(body):
    runs = [probe(body) for _ in range(3)]
    assert all(heavy == "" for _, heavy in runs), f"heavy modules imported: {runs[0][1]}"
    assert min(t for t, _ in runs) < 1.0, f"took {[round(t, 3) for t, _ in runs]} s of CPU time"
