"""Run each atheris harness (tests/fuzz/fuzz_*.py) for a bounded time, seeded with valid
encodings (``corpus.py``); a crash, hang or memory blow-up fails the test, naming the
reproducer libFuzzer wrote.

``PSTRAIN_FUZZ_SECONDS`` sets the time per harness (default 15, so the three add under
a minute to ``make test``); ``make fuzz`` runs them for longer. Reproduce a failure with
``python tests/fuzz/fuzz_<harness>.py <reproducer>``, then keep it under
tests/fuzz/regressions/<harness>/ (test_regressions.py replays those).
"""
from __future__ import annotations

import os
import pathlib
import subprocess
import sys

import pytest

from tests.fuzz import corpus

pytest.importorskip("atheris", reason="atheris is not installed (pip install -e '.[test]')")
pytestmark = pytest.mark.slow

HERE = pathlib.Path(__file__).parent
ROOT = HERE.parents[1]
HARNESSES = ("jobspec", "push_frame", "shm_header")
DEFAULT_SECONDS = 15


def fuzz_seconds() -> int:
    """How long each harness runs: ``PSTRAIN_FUZZ_SECONDS`` (an integer >= 1) or 15."""
    value = os.environ.get("PSTRAIN_FUZZ_SECONDS", str(DEFAULT_SECONDS))
    try:
        seconds = int(value)
    except ValueError:
        seconds = 0
    if seconds < 1:
        raise ValueError(f"PSTRAIN_FUZZ_SECONDS={value!r} is not a number of seconds; use an integer >= 1")
    return seconds


def run_harness(harness: str, seconds: int, workdir: pathlib.Path) -> tuple[subprocess.CompletedProcess, list]:
    """Fuzz ``harness`` for ``seconds`` from a fresh seed corpus; returns the process and the crash files."""
    seeds, artifacts = workdir / "corpus", workdir / "artifacts"
    corpus.write_seeds(harness, seeds)
    artifacts.mkdir()
    env = {k: v for k, v in os.environ.items() if k != "PSTRAIN_FUZZ_STRICT"}
    command = [
        sys.executable, str(HERE / f"fuzz_{harness}.py"), f"-max_total_time={seconds}", "-rss_limit_mb=2048",
        "-timeout=30", f"-artifact_prefix={artifacts}{os.sep}", str(seeds),
    ]
    # libFuzzer checks max_total_time between inputs: the slack covers start-up and one slow input.
    proc = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, errors="replace",
                          timeout=seconds + 120)
    return proc, sorted(artifacts.iterdir())


@pytest.mark.parametrize("harness", HARNESSES)
def test_harness_finds_nothing(harness, tmp_path):
    proc, crashes = run_harness(harness, fuzz_seconds(), tmp_path)
    if proc.returncode != 0 or crashes:
        lines = (proc.stdout + proc.stderr).splitlines()
        output = "\n".join(line for line in lines if not line.startswith("INFO: Instrumenting"))[-6000:]
        pytest.fail(
            f"fuzz_{harness} failed (exit {proc.returncode}); reproducer(s): {[str(c) for c in crashes]}\n"
            f"replay: {sys.executable} tests/fuzz/fuzz_{harness}.py <reproducer>\n"
            f"then keep it in tests/fuzz/regressions/{harness}/\n--- output (tail) ---\n{output}",
            pytrace=False,
        )
