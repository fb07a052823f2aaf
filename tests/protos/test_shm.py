"""Shared-memory segments (protos/shm.py) and framing into them (tensorwire.pack_into)."""
import os

import numpy as np
import pytest

from protos import shm, tensorwire
from protos.shm import Segment, SegmentUnavailable

pytestmark = pytest.mark.skipif(not os.path.isdir(shm.SHM_DIR), reason="no /dev/shm")


@pytest.fixture
def segment():
    seg = Segment.create(f"pstrain-test-{os.getpid()}", 4096, 8192)
    yield seg
    seg.close()


def test_a_frame_written_by_one_mapping_is_read_by_another(segment):
    peer = Segment.attach(segment.name, segment.token, 4096)
    try:
        arrays = {"w": np.arange(12, dtype=np.float32).reshape(3, 4), "s": np.float64(2.5), "e": np.zeros((0, 2), np.int64)}
        n = tensorwire.pack_into(segment.request, {"step": 3}, arrays)
        assert bytes(segment.request[:n]) == tensorwire.pack({"step": 3}, arrays)
        meta, got = tensorwire.unpack(peer.request[:n])
        assert meta == {"step": 3}
        for k, a in arrays.items():
            np.testing.assert_array_equal(got[k], a)
            assert got[k].dtype == np.asarray(a).dtype
        # and back through the reply area
        m = tensorwire.pack_into(peer.reply, {"version": 1}, {"w": arrays["w"] * 2})
        np.testing.assert_array_equal(tensorwire.unpack(segment.reply[:m])[1]["w"], arrays["w"] * 2)
        del got
    finally:
        peer.close()


def test_a_frame_too_big_for_the_area_is_refused(segment):
    with pytest.raises(ValueError, match="does not fit"):
        tensorwire.pack_into(segment.request, {}, {"w": np.zeros(2048, np.float32)})


def test_attach_checks_the_token_the_name_and_the_size(segment):
    with pytest.raises(SegmentUnavailable, match="different token"):
        Segment.attach(segment.name, b"x" * 16, 4096)
    with pytest.raises(SegmentUnavailable, match="not a pstrain shared-memory segment name"):
        Segment.attach("../etc/passwd", segment.token, 4096)
    with pytest.raises(SegmentUnavailable, match="cannot open"):
        Segment.attach("pstrain-no-such-segment", segment.token, 4096)
    with pytest.raises(SegmentUnavailable, match="holding"):
        Segment.attach(segment.name, segment.token, 10**9)


def test_attach_refuses_a_symlink(tmp_path, segment):
    link = os.path.join(shm.SHM_DIR, f"pstrain-link-{os.getpid()}")
    os.symlink(Segment.path(segment.name), link)
    try:
        with pytest.raises(SegmentUnavailable):
            Segment.attach(os.path.basename(link), segment.token, 4096)
    finally:
        os.unlink(link)


def test_the_creator_removes_the_segment_on_close():
    seg = Segment.create(f"pstrain-gone-{os.getpid()}", 64, 64)
    path = Segment.path(seg.name)
    assert os.path.exists(path) and (os.stat(path).st_mode & 0o777) == 0o600
    seg.close()
    seg.close()  # twice is fine
    assert not os.path.exists(path)


def test_closing_while_an_array_still_looks_at_the_segment_is_safe():
    seg = Segment.create(f"pstrain-held-{os.getpid()}", 1024, 1024)
    n = tensorwire.pack_into(seg.request, {}, {"w": np.ones(4, np.float32)})
    _, got = tensorwire.unpack(seg.request[:n])
    seg.close()  # the mapping stays until the array goes; the name is gone already
    np.testing.assert_array_equal(got["w"], np.ones(4, np.float32))
    assert not os.path.exists(Segment.path(seg.name))


def test_pstrain_shm_setting(monkeypatch):
    monkeypatch.setenv("PSTRAIN_SHM", "off")
    assert not shm.enabled()
    monkeypatch.setenv("PSTRAIN_SHM", "auto")
    assert shm.enabled()
    monkeypatch.setenv("PSTRAIN_SHM", "sometimes")
    with pytest.raises(ValueError, match="PSTRAIN_SHM"):
        shm.enabled()
