"""Raw tensor frames: round trips, zero-copy decoding, and clear errors for bad frames."""
import numpy as np
import pytest

from protos.tensorwire import pack, unpack


@pytest.mark.parametrize("dtype", ["float32", "float64", "int64", "int32", "uint8", "bool", "float16"])
@pytest.mark.parametrize("shape", [(), (0,), (3,), (2, 3), (2, 0, 4)])
def test_round_trip(dtype, shape):
    a = (np.arange(int(np.prod(shape))) % 7).astype(dtype).reshape(shape)
    meta, out = unpack(pack({"step": 3, "job": "j"}, {"a": a, "b": a[..., ::-1] if a.ndim else a}))
    assert meta == {"step": 3, "job": "j"}
    assert out["a"].dtype == a.dtype and out["a"].shape == a.shape
    np.testing.assert_array_equal(out["a"], a)
    np.testing.assert_array_equal(out["b"], a[..., ::-1] if a.ndim else a)


def test_decoding_views_the_frame_and_big_endian_input_is_converted():
    a = np.arange(6, dtype=">f4").reshape(2, 3)
    frame = pack({}, {"x": a})
    _, out = unpack(frame)
    np.testing.assert_array_equal(out["x"], a.astype("<f4"))
    assert not out["x"].flags.writeable and not out["x"].flags.owndata


@pytest.mark.parametrize(
    "frame,match",
    [
        (b"nope", "bad magic"),
        (b"PST1\xff\x00\x00\x00{}", "truncated"),
        (b"PST1\x02\x00\x00\x00{]", "header is not valid"),
    ],
)
def test_malformed_frames_raise(frame, match):
    with pytest.raises(ValueError, match=match):
        unpack(frame)


def test_truncated_and_trailing_bytes_name_the_problem():
    frame = pack({}, {"w": np.ones(10, np.float32)})
    with pytest.raises(ValueError, match="tensor 'w': frame truncated"):
        unpack(frame[:-4])
    with pytest.raises(ValueError, match="trailing bytes"):
        unpack(frame + b"xx")


def test_unsupported_dtype_is_refused_naming_the_tensor():
    with pytest.raises(ValueError, match="tensor 's'"):
        pack({}, {"s": np.array(["a"])})
