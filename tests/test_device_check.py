"""The device check survives first contact: it starts offline (what is missing comes from carried wheels, or is
named), and its dry run goes through every row on a CPU, writing each as it finishes."""

from __future__ import annotations

import os
import subprocess
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "benchmarks" / "device_check.sh"
ROWS = ("kernels", "device tests", "determinism", "8B step, ours", "8B step, HF+PEFT", "0.6B step, ours",
        "0.6B step, HF+PEFT", "decode")


def check(*args: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(SCRIPT), *args], env={**os.environ, **env}, capture_output=True, text=True,
                          timeout=600)


def test_dry_run_goes_through_every_row_and_writes_each_as_it_finishes(tmp_path):
    results = tmp_path / "out" / "device_check.md"
    done = check("--dry-run", "--out", str(results), STRATOS_DEVICE_TESTS="-k greedy")
    assert done.returncode == 0, done.stderr[-3000:]
    written = results.read_text()
    assert written == done.stdout  # the file holds every row printed, in order
    for row in ROWS:
        line = next(line for line in written.splitlines() if line.startswith(f"| {row} |"))
        assert "FAILED" not in line and "skipped" not in line, line
    assert "| device tests | summary 1 passed" in written and "bitwise equal, adapter bitwise equal" in written
    assert written.splitlines()[-1].startswith("total ")


def test_a_budget_skips_the_rows_that_would_not_fit_and_says_so(tmp_path):
    done = check("--dry-run", "--budget", "5", "--out", str(tmp_path / "results.md"))
    assert done.returncode == 0, done.stderr[-3000:]
    assert all(f"| {row} | skipped: about" in done.stdout for row in ROWS[1:])


def fake_wheel(folder: Path, name: str) -> Path:
    """A wheel of an empty package `name` (what a carried wheel gives a machine without a registry)."""
    wheel = folder / f"{name}-0.0.1-py3-none-any.whl"
    info = f"{name}-0.0.1.dist-info"
    with zipfile.ZipFile(wheel, "w") as archive:
        archive.writestr(f"{name}/__init__.py", "")
        archive.writestr(f"{info}/METADATA", f"Metadata-Version: 2.1\nName: {name}\nVersion: 0.0.1\n")
        archive.writestr(f"{info}/WHEEL", "Wheel-Version: 1.0\nRoot-Is-Purelib: true\nTag: py3-none-any\n")
        archive.writestr(f"{info}/RECORD", "".join(f"{path},,\n" for path in (f"{name}/__init__.py",
                                                                                f"{info}/METADATA", f"{info}/WHEEL",
                                                                                f"{info}/RECORD")))
    return wheel


def test_what_is_missing_comes_from_the_carried_wheels_or_is_named(tmp_path):
    name = "stratos_carried_probe"
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    refused = check("--help", STRATOS_NEEDED=f"json {name}", STRATOS_WHEELS=str(wheels))
    assert refused.returncode == 2 and f"missing {name}" in refused.stderr and "device_wheels.sh" in refused.stderr
    fake_wheel(wheels, name)
    started = check("--help", STRATOS_NEEDED=f"json {name}", STRATOS_WHEELS=str(wheels),
                    PIP_INDEX_URL="http://0.0.0.0:9")  # no registry: the wheel must come from the folder
    assert started.returncode == 0, started.stderr[-2000:]
    assert "device check" in started.stdout  # device_check.py's own --help: the check went on
