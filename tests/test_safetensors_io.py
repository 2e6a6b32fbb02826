import json
import struct

import numpy as np
import pytest

from mtpress.errors import CorruptCheckpointError
from mtpress.safetensors_io import (
    bf16_bytes_to_f32,
    f32_to_bf16_bytes,
    read_header,
    read_tensor_bytes,
    write_safetensors,
)


def test_round_trip_is_readable_by_the_safetensors_library(tmp_path):
    from safetensors.numpy import load_file

    values = np.arange(12, dtype=np.float32).reshape(3, 4)
    path = tmp_path / "a.safetensors"
    write_safetensors(path, [("x", "F32", (3, 4), values.tobytes())], metadata={"format": "pt"})
    assert np.array_equal(load_file(path)["x"], values)
    tensors, metadata = read_header(path)
    assert metadata == {"format": "pt"}
    assert read_tensor_bytes(path, tensors["x"]) == values.tobytes()
    assert not list(tmp_path.glob("*.partial"))


def test_bf16_rounding_is_nearest_even():
    values = np.array([1.0, -2.5, 3.14159, 1e-3, 65504.0], dtype=np.float32)
    restored = bf16_bytes_to_f32(f32_to_bf16_bytes(values), values.shape)
    assert np.allclose(restored, values, rtol=2**-8)
    assert restored[0] == 1.0 and restored[1] == -2.5


def _raw_file(path, header: dict, data: bytes):
    blob = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(blob)) + blob + data)
    return path


@pytest.mark.parametrize("header, data, message", [
    ({"x": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}}, b"\0" * 8, "outside the file"),
    ({"x": {"dtype": "F32", "shape": [4], "data_offsets": [0, 8]}}, b"\0" * 8, "needs 16"),
    ({"x": {"dtype": "Q9", "shape": [1], "data_offsets": [0, 1]}}, b"\0", "unknown dtype"),
    ({"x": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
      "y": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]}}, b"\0" * 12, "overlap"),
    ({"x": {"shape": [2]}}, b"", "malformed header entry"),
])
def test_damaged_headers_are_refused_with_the_tensor_named(tmp_path, header, data, message):
    path = _raw_file(tmp_path / "bad.safetensors", header, data)
    with pytest.raises(CorruptCheckpointError, match=message):
        read_header(path)


def test_truncated_and_garbage_files(tmp_path):
    short = tmp_path / "short.safetensors"
    short.write_bytes(b"\1\2")
    with pytest.raises(CorruptCheckpointError, match="too short"):
        read_header(short)
    huge = tmp_path / "huge.safetensors"
    huge.write_bytes(struct.pack("<Q", 10**9) + b"{}")
    with pytest.raises(CorruptCheckpointError, match="header length"):
        read_header(huge)
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(struct.pack("<Q", 4) + b"\xff\xfe{]")
    with pytest.raises(CorruptCheckpointError, match="not valid JSON"):
        read_header(garbage)
