"""Fuzz harnesses (atheris) and property tests (hypothesis) for the wire surface; see test_fuzz.py."""
