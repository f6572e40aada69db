"""shardllama's own GGUF header reader against gguf-py's GGUFReader: the same metadata values and the same
tensor views, on a file with every kind of value and tensor, on the demo model, and on broken files; and its
torch dequantizers against gguf.quants."""

from __future__ import annotations

import gguf
import numpy as np
import pytest
import torch

from shardllama.errors import ModelFileError, UnsupportedError
from shardllama.loading import open_checkpoint
from shardllama.loading.gguf_header import read_header

Q = gguf.GGMLQuantizationType


def reference(path):
    r = gguf.GGUFReader(path, "c")
    return {k: f.contents() for k, f in r.fields.items()}, r.tensors


def assert_same(path) -> None:
    fields, tensors = reference(path)
    h = read_header(path)
    assert h.fields == fields
    assert [t.name for t in h.tensors] == [t.name for t in tensors]
    for ours, theirs in zip(h.tensors, tensors):
        assert ours.tensor_type == theirs.tensor_type and ours.shape == tuple(theirs.shape.tolist())
        assert ours.n_bytes == theirs.n_bytes
        assert ours.data.dtype == theirs.data.dtype and ours.data.shape == theirs.data.shape
        assert np.array_equal(ours.data, theirs.data)
    assert all(t.data.flags.writeable for t in h.tensors)  # copy-on-write, as the loaders need


def test_every_value_type_and_tensor_type(tmp_path):
    path = tmp_path / "all.gguf"
    w = gguf.GGUFWriter(path, "llama")
    w.add_uint8("t.u8", 200)
    w.add_int8("t.i8", -100)
    w.add_uint16("t.u16", 60000)
    w.add_int16("t.i16", -30000)
    w.add_uint32("t.u32", 4_000_000_000)
    w.add_int32("t.i32", -2_000_000_000)
    w.add_uint64("t.u64", 2**63 + 5)
    w.add_int64("t.i64", -(2**62))
    w.add_float32("t.f32", 0.1)
    w.add_float64("t.f64", 0.1)
    w.add_bool("t.bool", True)
    w.add_string("t.str", "héllo ▁ 🦙")
    w.add_string("t.empty", "")
    w.add_array("t.ints", [1, -2, 3])
    w.add_array("t.floats", [0.5, 1.5])
    w.add_array("t.strs", ["a", "", "ü"])
    w.add_array("t.none", [])
    rng = np.random.default_rng(0)
    w.add_tensor("f32", rng.standard_normal((3, 64)).astype(np.float32))
    w.add_tensor("f16", rng.standard_normal((2, 64)).astype(np.float16))
    w.add_tensor("q8", gguf.quants.quantize(rng.standard_normal((4, 64)).astype(np.float32), Q.Q8_0), raw_dtype=Q.Q8_0)
    w.add_tensor("vec", rng.standard_normal(5).astype(np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    assert_same(path)


def test_demo_model(demo_gguf):
    assert_same(demo_gguf)


def test_broken_files_are_one_line_errors(tmp_path, demo_gguf):
    cut = tmp_path / "cut.gguf"
    with open(demo_gguf, "rb") as f:
        head = f.read(5_000_000)
    cut.write_bytes(head)
    with pytest.raises(ModelFileError, match="not a readable GGUF file.*runs past the end"):
        open_checkpoint(cut)
    cut.write_bytes(head[:100_000])  # inside the vocabulary
    with pytest.raises(ModelFileError, match="not a readable GGUF file"):
        open_checkpoint(cut)
    cut.write_bytes(b"GGML" + head[4:1000])
    with pytest.raises(ModelFileError, match="magic"):
        open_checkpoint(cut)
    swapped = bytearray(head[:1000])
    swapped[4:8] = (3).to_bytes(4, "big")
    cut.write_bytes(swapped)
    with pytest.raises(UnsupportedError, match="big-endian"):
        open_checkpoint(cut)


@pytest.mark.parametrize("qtype", [Q.Q4_0, Q.Q4_1, Q.Q8_0])
def test_torch_dequantize_is_gguf_quants_bit_for_bit(qtype):
    from shardllama.loading.gguf_dequant import IN_TORCH, dequantize

    assert qtype in IN_TORCH
    rng = np.random.default_rng(int(qtype))
    w = (rng.standard_normal((7, 96)) * rng.uniform(0.01, 10, (7, 1))).astype(np.float32)
    w[2] = 0.0  # a zero scale
    raw = gguf.quants.quantize(w, qtype)
    ours = dequantize(raw, qtype)
    assert ours.dtype == torch.float32 and ours.shape == (7, 96)
    assert torch.equal(ours, torch.from_numpy(gguf.quants.dequantize(raw, qtype)))
