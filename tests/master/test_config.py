"""master.config.MasterConfig: the fault-tolerance settings are checked on construction
and the error names the field, its value and what is allowed."""
from __future__ import annotations

import pytest

from master.config import MasterConfig


@pytest.mark.parametrize("field, value, words", [
    ("checkpoint_every", -1, "MasterConfig.checkpoint_every=-1 must be >= 0"),
    ("checkpoint_seconds", -1.0, "MasterConfig.checkpoint_seconds=-1.0 must be >= 0"),
    ("max_watchers", 64, "MasterConfig.max_watchers=64 is out of range; allowed [0, max_workers=64)"),
    ("max_watchers", -1, "MasterConfig.max_watchers=-1 is out of range"),
    ("recovery_timeout", 0, "recovery_timeout"),
    ("dead_node_ttl", -5, "dead_node_ttl"),
])
def test_bad_settings_name_the_field(field, value, words):
    with pytest.raises(ValueError, match=words.replace("[", r"\[").replace("(", r"\(").replace(")", r"\)")):
        MasterConfig(**{field: value})


def test_watcher_limit_defaults_to_half_the_rpc_threads():
    assert MasterConfig(max_workers=64).watcher_limit == 32
    assert MasterConfig(max_workers=8, max_watchers=3).watcher_limit == 3
    assert MasterConfig(max_workers=1).watcher_limit == 1
