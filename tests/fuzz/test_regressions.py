"""Replay every reproducer under tests/fuzz/regressions/<harness>/ through that
harness's ``TestOneInput``, so that fixed bugs stay fixed.

Files named ``known-*`` reproduce findings in code the fuzz work may not change (see
each harness's ``KNOWN_UNFIXED``): they are expected to fail, strictly, so the test
turns red once the bug is fixed, as a reminder to rename the file and drop the entry.
Every file is replayed with ``PSTRAIN_FUZZ_STRICT=1`` (no known finding stepped over).

To add one: copy the fuzzer's ``crash-<sha1>`` file here under a name saying what it
is, and check that it fails before the fix and passes after.
"""
from __future__ import annotations

import importlib
import logging
import pathlib

import pytest

pytest.importorskip("atheris", reason="atheris is not installed (pip install -e '.[test]')")

REGRESSIONS = pathlib.Path(__file__).parent / "regressions"
HARNESSES = ("jobspec", "push_frame", "shm_header")


def _cases():
    for harness in HARNESSES:
        for path in sorted((REGRESSIONS / harness).iterdir()):
            marks = []
            if path.name.startswith("known-"):
                marks.append(pytest.mark.xfail(strict=True, reason="a known, unfixed finding (see KNOWN_UNFIXED in "
                                               f"tests/fuzz/fuzz_{harness}.py); passing means it is fixed"))
            yield pytest.param(harness, path, id=f"{harness}/{path.name}", marks=marks)


@pytest.mark.parametrize("harness,path", list(_cases()))
def test_reproducer_is_handled(harness, path, monkeypatch):
    monkeypatch.setenv("PSTRAIN_FUZZ_STRICT", "1")
    logging.disable(logging.CRITICAL)  # refused pushes log warnings
    try:
        importlib.import_module(f"tests.fuzz.fuzz_{harness}").TestOneInput(path.read_bytes())
    finally:
        logging.disable(logging.NOTSET)


def test_every_harness_has_a_regressions_folder():
    assert sorted(p.name for p in REGRESSIONS.iterdir() if p.is_dir()) == sorted(HARNESSES)
