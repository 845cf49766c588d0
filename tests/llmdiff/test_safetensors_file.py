import json
import struct

import ml_dtypes
import numpy as np
import pytest
import safetensors.numpy

from llmdiff import safetensors_file
from llmdiff.errors import WeightsError


def test_round_trip_with_bfloat16(tmp_path):
    tensors = {"a": np.arange(6, dtype=np.float32).reshape(2, 3),
               "b": np.array([1.5, -2.25], dtype=ml_dtypes.bfloat16), "c": np.zeros((0, 4), np.float32)}
    safetensors_file.save(tmp_path / "x.safetensors", tensors)
    back = safetensors_file.load(tmp_path / "x.safetensors")
    assert set(back) == set(tensors)
    for k in tensors:
        assert back[k].dtype == tensors[k].dtype and np.array_equal(back[k], tensors[k])


def test_readable_by_the_safetensors_library(tmp_path):
    safetensors_file.save(tmp_path / "x.safetensors", {"w": np.ones((3, 2), np.float32)})
    assert np.array_equal(safetensors.numpy.load_file(str(tmp_path / "x.safetensors"))["w"], np.ones((3, 2)))


def test_truncated_names_the_tensor(tmp_path):
    f = tmp_path / "x.safetensors"
    safetensors_file.save(f, {"w": np.ones((64, 64), np.float32)})
    f.write_bytes(f.read_bytes()[:-10])
    with pytest.raises(WeightsError, match=r"truncated: tensor 'w' ends at byte"):
        safetensors_file.load(f)


def test_header_lies_about_shape(tmp_path):
    header = json.dumps({"w": {"dtype": "F32", "shape": [4, 4], "data_offsets": [0, 32]}}).encode()
    f = tmp_path / "x.safetensors"
    f.write_bytes(struct.pack("<Q", len(header)) + header + b"\0" * 32)
    with pytest.raises(WeightsError, match=r"offsets 0..32 do not match shape \[4, 4\]"):
        safetensors_file.load(f)


@pytest.mark.parametrize("content", [b"", b"abc", struct.pack("<Q", 10**12) + b"{}", struct.pack("<Q", 4) + b"nope"])
def test_not_safetensors(tmp_path, content):
    f = tmp_path / "x.safetensors"
    f.write_bytes(content)
    with pytest.raises(WeightsError, match="x.safetensors"):
        safetensors_file.load(f)
