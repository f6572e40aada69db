"""tools/make_gguf.py: the random LLaMA GGUF and the dequantized copy open in shardllama as written.

(That llama.cpp loads them too is checked by tools/bench_llamacpp.py, which needs llama-cpp-python; the
tests never do.)
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch

from shardllama.loading import load_weights, open_checkpoint
from shardllama.model import expected_shapes, random_weight
from shardllama.tokenizer_files import load_tokenizer

from .test_loading import ARGS, write_gguf

Q = gguf.GGMLQuantizationType


def _load_tool():
    path = Path(__file__).resolve().parents[1] / "tools" / "make_gguf.py"
    spec = importlib.util.spec_from_file_location("make_gguf", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules["make_gguf"] = module
    spec.loader.exec_module(module)
    return module


make_gguf = _load_tool()


def tensor_types(path: Path) -> dict[str, Q]:
    return {t.name: t.tensor_type for t in gguf.GGUFReader(path).tensors}


def test_vocabulary_is_laid_out_as_llama():
    tokens, scores, types = make_gguf.llama_vocab(32000)
    assert len(tokens) == len(set(tokens)) == len(scores) == len(types) == 32000
    assert tokens[:3] == ["<unk>", "<s>", "</s>"] and types[:3] == [2, 3, 3]
    assert tokens[3] == "<0x00>" and tokens[3 + 0x0A] == "<0x0A>" and tokens[258] == "<0xFF>"
    assert set(types[3:259]) == {6} and set(types[259:]) == {1}
    normal = set(tokens[259:])
    assert all(len(p) == 1 or p[:-1] in normal for p in normal)  # every piece is reachable by merges
    assert scores[259:] == sorted(scores[259:], reverse=True)
    with pytest.raises(ValueError):
        make_gguf.llama_vocab(100)


def test_tiny_random_model_opens_with_its_shapes_weights_and_tokenizer(tmp_path):
    args = make_gguf.random_args("tiny")
    path = make_gguf.write_random(tmp_path / "tiny.gguf", args, "f16", seed=3, progress=False)
    with open_checkpoint(path) as ckpt:
        assert ckpt.args.replace(norm_eps=args.norm_eps) == args
        assert ckpt.native_dtype == torch.float16
        weights = load_weights(ckpt, torch.float32)
        tok = load_tokenizer(path, gguf_fields=ckpt.gguf_fields)
    assert list(weights) == list(expected_shapes(args))
    for name, w in weights.items():  # norms stored f32, matrices f16
        want = random_weight(args, name, torch.float32, seed=3)
        assert torch.equal(w, want if w.ndim == 1 else want.half().float()), name
    types = tensor_types(path)
    assert types["blk.0.attn_norm.weight"] == Q.F32 and types["blk.0.attn_q.weight"] == Q.F16

    assert tok.kind == "gguf-llama" and tok.vocab_size == 32000
    assert (tok.bos_id, tok.eos_id, tok.add_bos) == (1, 2, True)
    text = "The meaning of life is 42.\nNaïve café — ☃"
    ids = tok.encode(text)
    assert ids[0] == 1 and 3 + 0x0A in ids  # BOS, and "\n" by byte fallback
    assert all(0 <= i < 32000 for i in ids) and len(ids) < len(text)  # pieces longer than one character
    assert tok.decode(ids) == text


def test_random_model_is_reproducible_and_seeded(tmp_path):
    args = make_gguf.random_args("tiny", n_layers=1, vocab_size=400)
    a = make_gguf.write_random(tmp_path / "a.gguf", args, "f32", seed=0, progress=False)
    b = make_gguf.write_random(tmp_path / "b.gguf", args, "f32", seed=0, progress=False)
    c = make_gguf.write_random(tmp_path / "c.gguf", args, "f32", seed=1, progress=False)
    assert a.read_bytes() == b.read_bytes()
    assert a.read_bytes() != c.read_bytes()
    assert not list(tmp_path.glob("*.partial"))


def test_llama_7b_shape_is_13_5_gb_in_f16():
    args = make_gguf.random_args("7b")
    params = sum(int(np.prod(s)) for s in expected_shapes(args).values())
    assert params == 6_738_415_616  # LLaMA-7B's parameter count
    assert (args.dim, args.n_layers, args.n_heads, args.hidden_dim, args.vocab_size) == (4096, 32, 32, 11008, 32000)


@pytest.mark.parametrize("dtype", ["f32", "f16"])
def test_dequantized_copy_has_the_same_metadata_and_values(tmp_path, dtype):
    src = write_gguf(tmp_path / "q.gguf", {n: random_weight(ARGS, n, seed=5) for n in expected_shapes(ARGS)}, ARGS,
                     Q.Q4_1, types={"token_embd.weight": Q.Q8_0})  # mixed, as the demo model is
    dst = make_gguf.write_dequantized(src, tmp_path / f"{dtype}.gguf", dtype, progress=False)
    want_type = {"f32": Q.F32, "f16": Q.F16}[dtype]
    assert {t for n, t in tensor_types(dst).items() if "norm" not in n} == {want_type}
    assert {t for n, t in tensor_types(dst).items() if "norm" in n} == {Q.F32}
    with open_checkpoint(src) as a, open_checkpoint(dst) as b:
        fa, fb = a.gguf_fields, b.gguf_fields
        # The source (test_loading's writer) has no file_type: the copy adds one, so one key more.
        assert {k for k in fa.keys() | fb.keys() if fa.get(k) != fb.get(k)} == {"general.file_type", "GGUF.kv_count"}
        assert fb["general.file_type"] == {"f32": 0, "f16": 1}[dtype]
        assert a.args == b.args
        for name in a.names():
            want = a.load(name, torch.float32)
            if dtype == "f16" and want.ndim == 2:
                want = want.half().float()
            assert torch.equal(b.load(name, torch.float32), want), name


def test_dequantizing_onto_the_source_is_refused(tmp_path):
    src = write_gguf(tmp_path / "q.gguf", {n: random_weight(ARGS, n) for n in expected_shapes(ARGS)}, ARGS, Q.Q8_0)
    with pytest.raises(ValueError, match="own source"):
        make_gguf.write_dequantized(src, src, "f16", progress=False)


def test_dequantized_demo_model_keeps_vocabulary_and_chat_template(tmp_path, demo_gguf):
    dst = make_gguf.write_dequantized(demo_gguf, tmp_path / "demo-f16.gguf", "f16", progress=False)
    a, b = load_tokenizer(demo_gguf), load_tokenizer(dst)
    assert a.chat_template is not None and a.chat_template == b.chat_template
    text = "<|im_start|>user\nThe meaning of life is<|im_end|>\n"
    assert a.encode(text) == b.encode(text)
    assert (a.vocab_size, a.bos_id, a.eos_id, a.stop_ids) == (b.vocab_size, b.bos_id, b.eos_id, b.stop_ids)
    dst.unlink()  # 270 MB: pytest keeps the last runs' temporary directories
