"""GGUF tensor types beyond the float and Q8_0/Q4_x ones (K-quants, IQ*, ...), and split GGUF models.

gguf-py dequantizes the K-quants but cannot quantize them, so ``gguf_ref_quants`` quantizes from the block
layouts; its blocks are checked against gguf's dequantizer first.  Then whole models in each type: shardllama
loads exactly what ``gguf.quants.dequantize`` makes of the bytes, near the floats they came from, and computes
transformers' logits from the same file.  Types without a quantizer on either side are loaded from random
bytes (equal to gguf's dequantization; the values mean nothing).  Split models are written by gguf-py's own
split writer (what ``convert_hf_to_gguf.py --split-max-tensors`` uses, the layout of llama.cpp's gguf-split)
or part by part for the broken ones.

Shapes: dim 256 and FFN 512, so every matrix row is whole 256-value super-blocks.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from gguf import GGML_QUANT_SIZES

from shardllama.config import ModelArgs
from shardllama.errors import ModelFileError, UnsupportedError
from shardllama.loading import open_checkpoint
from shardllama.model import Transformer, expected_shapes

from .gguf_ref_quants import REFERENCE, quantize
from .helpers import seq_cache
from .test_loading import add_gguf_metadata, assert_same, esc, gguf_name, load_all, write_gguf

Q = gguf.GGMLQuantizationType
ARGS = ModelArgs(dim=256, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=64, hidden_dim=512, max_seq_len=64)
FLOATS = (Q.F32, Q.F16, Q.BF16)
TOKENS = torch.tensor([[1, 17, 42, 63, 3, 3, 60, 8, 0, 55, 21, 30]])


def gguf_dequantizes(qtype: Q) -> bool:
    """Asked of gguf itself (one zero block), independently of the loader's own check."""
    try:
        gguf.quants.dequantize(np.zeros((1, GGML_QUANT_SIZES[qtype][1]), np.uint8), qtype)
    except NotImplementedError:
        return False
    return True


DEQUANTIZABLE = [q for q in Q if gguf_dequantizes(q) and q not in FLOATS]  # floats: test_loading
NOT_DEQUANTIZABLE = [q for q in Q if not gguf_dequantizes(q)]
# Types with a quantizer (ours, else gguf's): real weights, so their logits can be compared.
QUANTIZED = [*REFERENCE, Q.Q5_0, Q.Q5_1]


def test_the_types_people_download_are_dequantizable():
    assert {Q.Q2_K, Q.Q3_K, Q.Q4_K, Q.Q5_K, Q.Q6_K, Q.Q5_0, Q.Q5_1, Q.IQ4_NL, Q.IQ4_XS} <= set(DEQUANTIZABLE)
    assert Q.Q8_1 in NOT_DEQUANTIZABLE and Q.Q8_K in NOT_DEQUANTIZABLE  # llama.cpp's activation formats


# ---- the reference quantizers --------------------------------------------------------------------

# The largest error our quantizers may make, as a fraction of the block's range including 0 ("affine" types,
# whose offset is stored) or of its largest |x| ("symmetric" ones): half a step of the grid, plus 10% for the
# rounding-up of the integer sub-block scales and of f16 d.  IQ4's steps are uneven: the widest is 24 of 113.
ERROR_BOUND = {
    Q.Q2_K: ("affine", 1.1 / 6),  # 4 levels
    Q.Q3_K: ("symmetric", 1.1 / 6),  # -4..3 in steps of max|x| / 3
    Q.Q4_K: ("affine", 1.1 / 30),
    Q.Q5_K: ("affine", 1.1 / 62),
    Q.Q6_K: ("symmetric", 1.1 / 62),  # -32..31 in steps of max|x| / 31
    Q.IQ4_NL: ("symmetric", 1.1 * 12 / 113),
    Q.IQ4_XS: ("symmetric", 1.1 * 12 / 113),
}
assert set(ERROR_BOUND) == set(REFERENCE)


def awkward_rows(rng: np.random.Generator, n: int, k: int) -> np.ndarray:
    """Normal rows, and the blocks that break careless quantizers: all zero, constant, one-signed, outliers."""
    x = rng.standard_normal((n, k)).astype(np.float32)
    x[0] = 0
    x[1, :256] = 0.75
    x[2, :256] = np.abs(x[2, :256])
    x[3, :256] = -np.abs(x[3, :256])
    x[4, ::97] *= 50
    return x


@pytest.mark.parametrize("qtype", list(REFERENCE), ids=lambda q: q.name)
def test_reference_quantizer_blocks_dequantize_back_within_the_step(qtype):
    block, type_size = GGML_QUANT_SIZES[qtype]
    x = awkward_rows(np.random.default_rng(1), 16, 512)
    raw = quantize(x, qtype)
    assert raw.dtype == np.uint8 and raw.shape == (16, 512 // block * type_size)
    y = gguf.quants.dequantize(raw, qtype)
    assert y.shape == x.shape
    kind, bound = ERROR_BOUND[qtype]
    xb, err = x.reshape(-1, block), np.abs(y - x).reshape(-1, block).max(axis=1)
    scale = np.maximum(xb.max(axis=1), 0) - np.minimum(xb.min(axis=1), 0) if kind == "affine" else np.abs(xb).max(axis=1)
    assert (err <= bound * scale).all(), (err / np.where(scale > 0, scale, 1)).max()
    assert (err[scale == 0] == 0).all()  # zero blocks stay exactly zero


# ---- whole models ------------------------------------------------------------------------------------


def model_floats(args: ModelArgs = ARGS, seed: int = 0) -> dict[str, np.ndarray]:
    """Meta-named weights: matrices with std 2/sqrt(fan-in) (peaked attention, logits of a few units, so a
    misplaced row cannot hide), embeddings std 1, norms around 1."""
    rng = np.random.default_rng(seed)
    out = {}
    for name, shape in expected_shapes(args).items():
        if len(shape) == 1:
            out[name] = 1 + 0.1 * rng.standard_normal(shape)
        else:
            out[name] = rng.standard_normal(shape) * (1.0 if name == "tok_embeddings.weight" else 2 / np.sqrt(shape[1]))
    return {name: x.astype(np.float32) for name, x in out.items()}


def encode(floats: dict[str, np.ndarray], types: dict[str, Q] | Q) -> dict[str, tuple[np.ndarray, Q]]:
    """GGUF name -> (stored array, type): matrices in ``types`` (one for all, or per Meta name), norms F32."""
    out = {}
    for name, x in floats.items():
        qtype = Q.F32 if x.ndim == 1 else types if isinstance(types, Q) else types[name]
        out[gguf_name(name)] = (x if qtype == Q.F32 else quantize(x, qtype), qtype)  # F16: gguf's float16 array
    return out


def random_blocks(args: ModelArgs, qtype: Q, seed: int = 0) -> dict[str, tuple[np.ndarray, Q]]:
    """Matrices of random ``qtype`` bytes (for types nothing here can quantize), norms F32."""
    rng = np.random.default_rng(seed)
    block, type_size = GGML_QUANT_SIZES[qtype]
    out = {}
    for name, shape in expected_shapes(args).items():
        if len(shape) == 1:
            out[gguf_name(name)] = (np.ones(shape, np.float32), Q.F32)
        else:
            raw = rng.integers(0, 256, (shape[0], shape[1] // block * type_size), dtype=np.uint8)
            out[gguf_name(name)] = (raw, qtype)
    return out


def write_model(path: Path, tensors: dict[str, tuple[np.ndarray, Q]], args: ModelArgs = ARGS, **writer_kw) -> Path:
    """A llama GGUF of already-encoded tensors; ``writer_kw`` go to GGUFWriter (``split_max_tensors``...)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    w = gguf.GGUFWriter(path, "llama", **writer_kw)
    add_gguf_metadata(w, args)
    _write_tensors(w, tensors)
    return path


def _write_tensors(w: gguf.GGUFWriter, tensors: dict[str, tuple[np.ndarray, Q]]) -> None:
    for name, (data, qtype) in tensors.items():
        w.add_tensor(name, data, raw_dtype=qtype if data.dtype == np.uint8 else None)  # floats carry their type
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def dequantized(tensors: dict[str, tuple[np.ndarray, Q]], args: ModelArgs = ARGS) -> dict[str, torch.Tensor]:
    """What the loader must give for each Meta name: gguf's dequantization of the stored bytes."""
    by_gguf = {gguf_name(name): name for name in expected_shapes(args)}
    return {by_gguf[g]: torch.from_numpy(gguf.quants.dequantize(data, qtype).copy()) for g, (data, qtype) in tensors.items()}


def transformers_logits(path: Path) -> torch.Tensor:
    transformers = pytest.importorskip("transformers")
    hf = transformers.AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
    with torch.no_grad():
        return hf.eval()(TOKENS).logits


def our_logits(args: ModelArgs, weights: dict[str, torch.Tensor]) -> torch.Tensor:
    model = Transformer(args, weights)
    return model.forward(TOKENS, seq_cache(model), all_logits=True)


@pytest.mark.parametrize("qtype", QUANTIZED, ids=lambda q: q.name)
def test_quantized_model_loads_gguf_dequantization_and_matches_transformers(tmp_path, qtype):
    floats = model_floats()
    tensors = encode(floats, qtype)
    path = write_model(tmp_path / "model.gguf", tensors)
    ckpt, loaded = load_all(path)
    assert ckpt.native_dtype == torch.float32  # quantized types count as what they dequantize to
    assert_same(loaded, dequantized(tensors))
    for name, x in floats.items():  # near the floats: every row and block where it belongs
        assert np.abs(loaded[name].numpy() - x).max() <= 0.4 * np.abs(x).max(), name
    ours, ref = our_logits(ckpt.args, loaded), transformers_logits(path)
    assert ref.abs().max() > 1.0
    torch.testing.assert_close(ours, ref, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("qtype", DEQUANTIZABLE, ids=lambda q: q.name)
@pytest.mark.filterwarnings("ignore:invalid value:RuntimeWarning", "ignore:overflow:RuntimeWarning")  # random scales
def test_every_type_gguf_dequantizes_loads_as_gguf_dequantizes_it(tmp_path, qtype):
    tensors = random_blocks(ARGS, qtype)
    path = write_model(tmp_path / "model.gguf", tensors)
    _, loaded = load_all(path)
    for name, want in dequantized(tensors).items():
        assert loaded[name].dtype == torch.float32
        torch.testing.assert_close(loaded[name], want, rtol=0, atol=0, equal_nan=True)  # random bytes: NaN scales too


@pytest.mark.parametrize("qtype", NOT_DEQUANTIZABLE, ids=lambda q: q.name)
def test_a_type_gguf_cannot_dequantize_is_named(tmp_path, qtype):
    tensors = random_blocks(ARGS, Q.Q8_0)
    block, type_size = GGML_QUANT_SIZES[qtype]
    tensors["blk.1.attn_k.weight"] = (np.zeros((ARGS.kv_dim, ARGS.dim // block * type_size), np.uint8), qtype)
    path = write_model(tmp_path / "model.gguf", tensors)
    with pytest.raises(UnsupportedError, match=rf"^{esc(path)}: tensor 'blk\.1\.attn_k\.weight' has unsupported type {qtype.name} "):
        open_checkpoint(path)


def test_mixed_q4_k_m_style_file(tmp_path):
    """As llama.cpp's Q4_K_M: Q4_K, with Q6_K for the output head and (in half the layers) attn_v and
    ffn_down; norms F32; and one Q8_0 and one F16 matrix, for good measure."""
    floats = model_floats(seed=2)
    types = {name: Q.Q4_K for name in floats}
    types.update({"output.weight": Q.Q6_K, "layers.0.attention.wv.weight": Q.Q6_K,
                  "layers.0.feed_forward.w2.weight": Q.Q6_K, "layers.1.attention.wq.weight": Q.Q8_0,
                  "layers.1.feed_forward.w3.weight": Q.F16})
    tensors = encode(floats, types)
    path = write_model(tmp_path / "model-Q4_K_M.gguf", tensors)
    ckpt, loaded = load_all(path)
    assert ckpt.native_dtype == torch.float32
    stored = {t.name: t.tensor_type for t in gguf.GGUFReader(path).tensors}
    assert stored["output.weight"] == Q.Q6_K and stored["blk.1.ffn_up.weight"] == Q.F16
    assert stored["output_norm.weight"] == Q.F32 and stored["token_embd.weight"] == Q.Q4_K
    assert_same(loaded, dequantized(tensors))
    torch.testing.assert_close(our_logits(ckpt.args, loaded), transformers_logits(path), rtol=1e-4, atol=1e-4)


# ---- split models ------------------------------------------------------------------------------------


def part_names(prefix: str, n: int) -> list[str]:
    return [f"{prefix}-{i:05d}-of-{n:05d}.gguf" for i in range(1, n + 1)]


def write_parts(d: Path, tensors: dict[str, tuple[np.ndarray, Q]], groups: list[list[str]],
                total: int | None = None) -> list[Path]:
    """Parts written one by one, for the broken sets gguf-py's writer cannot make: each holds the tensors
    named in its group and the three split keys (``total`` overrides split.tensors.count); the first also
    holds the model metadata.  (GGUFWriter adds general.architecture to every part; gguf-split keeps it to
    the first, which the loader does not mind.)"""
    total = sum(map(len, groups)) if total is None else total
    paths = [d / name for name in part_names("model", len(groups))]
    for no, (path, names) in enumerate(zip(paths, groups)):
        w = gguf.GGUFWriter(path, "llama")
        if no == 0:
            add_gguf_metadata(w, ARGS)
        w.add_uint16("split.no", no)
        w.add_uint16("split.count", len(groups))
        w.add_int32("split.tensors.count", total)
        _write_tensors(w, {name: tensors[name] for name in names})
    return paths


def write_split(d: Path, tensors: dict[str, tuple[np.ndarray, Q]], max_tensors: int, small_first: bool = False) -> list[Path]:
    """The model split by gguf-py's writer, at most ``max_tensors`` per part (``small_first``: the first part
    holds only the metadata, as gguf-split's --no-tensor-first-split): its parts, first first."""
    write_model(d / "model.gguf", tensors, split_max_tensors=max_tensors, small_first_shard=small_first)
    return sorted(d.glob("*.gguf"))


def split_tensors() -> dict[str, tuple[np.ndarray, Q]]:
    floats = model_floats(seed=3)
    return encode(floats, {name: (Q.Q4_K, Q.Q6_K, Q.Q8_0)[i % 3] for i, name in enumerate(floats)})


N_TENSORS = len(expected_shapes(ARGS))  # 21


@pytest.mark.parametrize("max_tensors, small_first, n_parts", [(11, False, 2), (8, False, 3), (10, True, 4)],
                         ids=["2-parts", "3-parts", "metadata-only-first-part"])
def test_split_model_loads_as_the_whole_file_from_any_part_or_its_directory(tmp_path, max_tensors, small_first, n_parts):
    tensors = split_tensors()
    whole_ckpt, whole = load_all(write_model(tmp_path / "whole" / "model.gguf", tensors))
    parts = write_split(tmp_path / "split", tensors, max_tensors, small_first)
    assert [p.name for p in parts] == part_names("model", n_parts)
    # gguf-split's layout: the config and vocabulary in the first part only, the split keys in every part.
    later = {k for k in gguf.GGUFReader(parts[-1]).fields if not k.startswith("GGUF.")}
    assert later == {"split.no", "split.count", "split.tensors.count"}
    assert len(gguf.GGUFReader(parts[0]).tensors) == (0 if small_first else max_tensors)
    for named in (parts[0], tmp_path / "split", parts[-1]):
        ckpt, loaded = load_all(named)
        assert ckpt.format == "gguf" and ckpt.path == parts[0] and ckpt.tokenizer_path == parts[0], named
        assert ckpt.args == whole_ckpt.args
        assert ckpt.gguf_fields["tokenizer.ggml.tokens"] == whole_ckpt.gguf_fields["tokenizer.ggml.tokens"]
        assert_same(loaded, whole)
    assert_same(whole, dequantized(tensors))


def test_split_missing_part_is_named(tmp_path):
    parts = write_split(tmp_path, split_tensors(), 8)
    parts[1].unlink()
    for named in (parts[0], tmp_path, parts[2]):
        with pytest.raises(ModelFileError, match=rf"^{esc(parts[1])}: file not found \(part 2 of 3 of the split model "):
            open_checkpoint(named)
    parts[0].unlink()  # the directory's first part by name is now part 3, which finds part 1 missing
    with pytest.raises(ModelFileError, match=rf"^{esc(parts[0])}: file not found \(part 1 of 3 "):
        open_checkpoint(tmp_path)


def test_split_part_of_another_split_is_named(tmp_path):
    tensors = split_tensors()
    two = write_split(tmp_path / "two", tensors, 11)
    three = write_split(tmp_path / "three", tensors, 8)
    shutil.copy(three[1], two[1])  # part 2 of 3 under the name of part 2 of 2
    with pytest.raises(ModelFileError, match=rf"^{esc(two[1])}: split metadata 'split\.count' is 3, expected 2 \(part 2 of 2\)$"):
        open_checkpoint(two[0])


def test_split_part_renamed_cannot_find_its_siblings(tmp_path):
    parts = write_split(tmp_path, split_tensors(), 11)
    renamed = parts[0].rename(tmp_path / "model.gguf")
    with pytest.raises(ModelFileError, match=rf"^{esc(renamed)}: split part 1 of 2, but not named NAME-00001-of-00002\.gguf"):
        open_checkpoint(renamed)


def test_split_tensor_in_two_parts_is_named(tmp_path):
    tensors = split_tensors()
    names = list(tensors)
    paths = write_parts(tmp_path, tensors, [names[:12], names[12:] + names[:1]])
    with pytest.raises(ModelFileError, match=rf"^{esc(paths[1])}: tensor 'token_embd\.weight' is also in {esc(paths[0])}$"):
        open_checkpoint(paths[0])


def test_split_tensor_count_must_match_the_parts(tmp_path):
    tensors = split_tensors()
    names = list(tensors)
    assert len(names) == N_TENSORS
    paths = write_parts(tmp_path, tensors, [names[:12], names[12:-1]], total=N_TENSORS)
    with pytest.raises(ModelFileError, match=rf"^{esc(paths[0])}: split\.tensors\.count is 21 but the parts hold 20 tensors$"):
        open_checkpoint(paths[1])
    # Consistent parts written by hand (split keys as gguf-split writes them) load.
    (tmp_path / "ok").mkdir()
    write_parts(tmp_path / "ok", tensors, [names[:5], names[5:9], names[9:]])
    assert_same(load_all(tmp_path / "ok")[1], dequantized(tensors))


def test_directory_with_a_split_model_and_another_gguf(tmp_path):
    write_split(tmp_path, split_tensors(), 11)
    write_gguf(tmp_path / "other.gguf", {})
    with pytest.raises(ModelFileError, match=r"holds 3 \.gguf files; name the one to load"):
        open_checkpoint(tmp_path)


def test_whole_file_named_like_a_part_is_a_whole_model(tmp_path):
    """The metadata (no split.count) decides, not the name."""
    tensors = split_tensors()
    path = write_model(tmp_path / part_names("model", 2)[0], tensors)
    assert_same(load_all(path)[1], dequantized(tensors))
