"""Checkpoint loaders: tiny checkpoints written in the real formats by the real libraries.

Meta ``.pth`` (single, split in 2 and 4, unzipped), HF safetensors (sharded, checked against transformers'
logits, which proves the q/k un-permutation), GGUF (the float types and those gguf-py quantizes; the demo
model checked against transformers' logits, which proves that GGUF needs no permutation; K-quants, IQ* and
split files are in test_gguf_quants.py) and every error path.
"""

from __future__ import annotations

import collections
import json
import os
import pickle
import re
import shutil
import zipfile
from pathlib import Path
from typing import Callable

import gguf
import numpy as np
import pytest
import torch

from shardllama.config import ModelArgs
from shardllama.errors import ModelFileError, UnsupportedError
from shardllama.loading import Checkpoint, load_weights, open_checkpoint
from shardllama.model import Transformer, expected_shapes, random_weights
from tests.helpers import seq_cache

# Tiny LLaMA: dim 64, 2 layers, 8 heads, 2 KV heads, FFN 96 (int(0.5 * int(2 * 256 / 3)) = 85 -> 96), vocab 100.
PARAMS = {
    "dim": 64,
    "n_layers": 2,
    "n_heads": 8,
    "n_kv_heads": 2,
    "vocab_size": 100,
    "multiple_of": 32,
    "ffn_dim_multiplier": 0.5,
    "norm_eps": 1e-5,
    "rope_theta": 10000.0,
}
ARGS = ModelArgs.from_params_json(PARAMS)
assert ARGS.hidden_dim == 96
Q = gguf.GGMLQuantizationType


def esc(path: Path) -> str:
    return re.escape(str(path))


def assert_same(loaded: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    assert list(loaded) == list(want) or set(loaded) == set(want)
    for name, w in want.items():
        assert loaded[name].dtype == w.dtype, name
        assert torch.equal(loaded[name], w), name


def load_all(path: Path, dtype: torch.dtype = torch.float32, **kw) -> tuple[Checkpoint, dict[str, torch.Tensor]]:
    with open_checkpoint(path, **kw) as ckpt:
        return ckpt, load_weights(ckpt, dtype)


# ---- writers: the real formats, by the real libraries ---------------------------------------------------

# How Meta's model-parallel files cut each weight (written out independently of the loader's table).
META_CUT = {"wq": 0, "wk": 0, "wv": 0, "w1": 0, "w3": 0, "output": 0, "wo": 1, "w2": 1, "tok_embeddings": 1}


def meta_cut_dim(name: str) -> int | None:
    return META_CUT.get(name.split(".")[-2])  # 'layers.0.attention.wq.weight' -> 'wq'; norms -> None


def write_meta(d: Path, weights: dict[str, torch.Tensor], n_files: int = 1, params: dict | None = None,
               extra: dict[str, torch.Tensor] | None = None, views: bool = False) -> Path:
    """consolidated.NN.pth files exactly as Meta's model-parallel export cuts them, and params.json.

    ``views``: save each piece as a view of the full weight, so the files hold storage offsets and strides.
    """
    d.mkdir(parents=True, exist_ok=True)
    for i in range(n_files):
        shard = {}
        for name, w in weights.items():
            dim = meta_cut_dim(name)
            piece = w if dim is None else w.chunk(n_files, dim)[i]
            shard[name] = piece if views else piece.clone()
        shard["rope.freqs"] = torch.randn(ARGS.head_dim // 2)  # old checkpoints carry it; ignored
        shard.update(extra or {})
        torch.save(shard, d / f"consolidated.{i:02d}.pth")
    (d / "params.json").write_text(json.dumps(params or PARAMS))
    return d


def hf_permute(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Meta -> HF rotate-half, as transformers' convert_llama_weights_to_hf.py does it."""
    dim1, dim2 = w.shape
    return w.view(n_heads, dim1 // n_heads // 2, 2, dim2).transpose(1, 2).reshape(dim1, dim2)


HF_FROM_META = {
    "tok_embeddings": "model.embed_tokens",
    "attention.wq": "self_attn.q_proj",
    "attention.wk": "self_attn.k_proj",
    "attention.wv": "self_attn.v_proj",
    "attention.wo": "self_attn.o_proj",
    "feed_forward.w1": "mlp.gate_proj",
    "feed_forward.w2": "mlp.down_proj",
    "feed_forward.w3": "mlp.up_proj",
    "attention_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "norm": "model.norm",
    "output": "lm_head",
}


def hf_name(meta: str) -> str:
    base = meta.removesuffix(".weight")
    if base.startswith("layers."):
        _, i, rest = base.split(".", 2)
        return f"model.layers.{i}.{HF_FROM_META[rest]}.weight"
    return HF_FROM_META[base] + ".weight"


def hf_config(args: ModelArgs, **changes) -> dict:
    config = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": args.dim,
        "intermediate_size": args.hidden_dim,
        "num_hidden_layers": args.n_layers,
        "num_attention_heads": args.n_heads,
        "num_key_value_heads": args.n_kv_heads,
        "vocab_size": args.vocab_size,
        "rms_norm_eps": args.norm_eps,
        "rope_theta": args.rope_theta,
        "max_position_embeddings": args.max_seq_len,
        "tie_word_embeddings": args.tie_embeddings,
    }
    config.update(changes)
    return config


def write_hf(d: Path, weights: dict[str, torch.Tensor], args: ModelArgs = ARGS, extra: dict[str, torch.Tensor] | None = None) -> Path:
    """One model.safetensors in HF names and HF's rotate-half q/k layout, and config.json."""
    from safetensors.torch import save_file

    d.mkdir(parents=True, exist_ok=True)
    out = {}
    for name, w in weights.items():
        if name.endswith("attention.wq.weight"):
            w = hf_permute(w, args.n_heads)
        elif name.endswith("attention.wk.weight"):
            w = hf_permute(w, args.n_kv_heads)
        out[hf_name(name)] = w.contiguous()
    out.update(extra or {})
    save_file(out, d / "model.safetensors")
    (d / "config.json").write_text(json.dumps(hf_config(args)))
    return d


GGUF_FROM_META = {
    "tok_embeddings": "token_embd",
    "attention.wq": "attn_q",
    "attention.wk": "attn_k",
    "attention.wv": "attn_v",
    "attention.wo": "attn_output",
    "feed_forward.w1": "ffn_gate",
    "feed_forward.w2": "ffn_down",
    "feed_forward.w3": "ffn_up",
    "attention_norm": "attn_norm",
    "ffn_norm": "ffn_norm",
    "norm": "output_norm",
    "output": "output",
}


def gguf_name(meta: str) -> str:
    base = meta.removesuffix(".weight")
    if base.startswith("layers."):
        _, i, rest = base.split(".", 2)
        return f"blk.{i}.{GGUF_FROM_META[rest]}.weight"
    return GGUF_FROM_META[base] + ".weight"


def write_gguf(path: Path, weights: dict[str, np.ndarray | torch.Tensor], args: ModelArgs = ARGS, qtype=None,
               arch: str = "llama", types: dict[str, object] | None = None) -> Path:
    """A llama.cpp-style GGUF: metadata, a tiny llama vocab, matrices in ``qtype`` and norms in F32.

    ``weights`` is in Meta names (converted) unless a key already looks like a GGUF name; uint8 arrays are
    written as they are, as raw blocks of their ``types`` entry.
    """
    qtype = qtype or gguf.GGMLQuantizationType.F32
    path.parent.mkdir(parents=True, exist_ok=True)
    w = gguf.GGUFWriter(path, arch)
    add_gguf_metadata(w, args)
    for name, t in weights.items():
        data = t.float().numpy() if isinstance(t, torch.Tensor) else t
        name = name if name.startswith(("blk.", "token_embd", "output", "rope_freqs")) else gguf_name(name)
        kind = (types or {}).get(name, qtype if data.ndim == 2 else gguf.GGMLQuantizationType.F32)
        if data.dtype == np.uint8:  # already encoded as ``kind`` (bytes of a type gguf cannot quantize)
            w.add_tensor(name, data, raw_dtype=kind)
        elif kind in (gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16):
            w.add_tensor(name, gguf.quants.quantize(data.astype(np.float32), kind))
        else:
            w.add_tensor(name, gguf.quants.quantize(data.astype(np.float32), kind), raw_dtype=kind)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def add_gguf_metadata(w: gguf.GGUFWriter, args: ModelArgs) -> None:
    """The llama.cpp config keys for ``args`` and a tiny SentencePiece-style ``llama`` vocabulary."""
    w.add_block_count(args.n_layers)
    w.add_context_length(args.max_seq_len)
    w.add_embedding_length(args.dim)
    w.add_feed_forward_length(args.hidden_dim)
    w.add_head_count(args.n_heads)
    w.add_head_count_kv(args.n_kv_heads)
    w.add_layer_norm_rms_eps(args.norm_eps)
    w.add_rope_freq_base(args.rope_theta)
    w.add_rope_dimension_count(args.head_dim)
    w.add_tokenizer_model("llama")
    w.add_token_list(["<unk>", "<s>", "</s>"] + [f"tok{i}" for i in range(args.vocab_size - 3)])
    w.add_token_scores([0.0, 0.0, 0.0] + [-float(i) for i in range(args.vocab_size - 3)])
    w.add_token_types([2, 3, 3] + [1] * (args.vocab_size - 3))


# ---- Meta .pth ---------------------------------------------------------------------------------------


def test_meta_single_file_loads_exactly(tmp_path):
    weights = random_weights(ARGS)
    (tmp_path / "tokenizer.model").write_bytes(b"spm")  # Meta's layout: beside the 7B/ folder
    d = write_meta(tmp_path / "7B", weights)
    ckpt, loaded = load_all(d)
    assert ckpt.format == "meta" and ckpt.path == d and ckpt.gguf_fields is None
    assert ckpt.args == ARGS
    assert ckpt.tokenizer_path == tmp_path / "tokenizer.model"
    assert ckpt.names() == list(expected_shapes(ARGS))
    assert_same(loaded, weights)


@pytest.mark.parametrize("n_files", [2, 4])
def test_meta_split_files_merge_to_the_unsplit_weights(tmp_path, n_files):
    weights = random_weights(ARGS, seed=1)
    d = write_meta(tmp_path, weights, n_files=n_files)
    assert len(list(d.glob("consolidated.*.pth"))) == n_files
    _, loaded = load_all(d)
    assert_same(loaded, weights)
    # Naming one of the files opens the whole set.
    _, loaded = load_all(d / "consolidated.01.pth")
    assert_same(loaded, weights)


def test_meta_split_converts_dtype_while_merging(tmp_path):
    weights = random_weights(ARGS, dtype=torch.bfloat16, seed=2)
    d = write_meta(tmp_path, weights, n_files=2)
    _, loaded = load_all(d, torch.float32)
    assert_same(loaded, {k: v.float() for k, v in weights.items()})
    with open_checkpoint(d) as ckpt:
        assert ckpt.native_dtype == torch.bfloat16
        t = ckpt.load("layers.1.feed_forward.w2.weight", torch.float16)
    assert t.dtype == torch.float16 and t.is_contiguous()
    assert torch.equal(t, weights["layers.1.feed_forward.w2.weight"].half())


def test_meta_vocab_size_minus_one_comes_from_the_embeddings(tmp_path):
    weights = random_weights(ARGS, seed=3)
    d = write_meta(tmp_path, weights, n_files=2, params={**PARAMS, "vocab_size": -1})
    ckpt, loaded = load_all(d)
    assert ckpt.args.vocab_size == 100
    assert_same(loaded, weights)


def test_meta_without_output_weight_is_tied(tmp_path):
    args = ARGS.replace(tie_embeddings=True)
    weights = random_weights(args, seed=4)
    ckpt, loaded = load_all(write_meta(tmp_path, weights))
    assert ckpt.args.tie_embeddings and "output.weight" not in ckpt.names()
    assert_same(loaded, weights)


def unzip_pth(pth: Path, target: Path, flatten: bool) -> None:
    """What rllama users do: unzip consolidated.00.pth into consolidated.00/ (data.pkl one level down,
    in the zip's own folder) or move its contents up so data.pkl sits directly in the folder."""
    with zipfile.ZipFile(pth) as z:
        z.extractall(target)
    if flatten:
        (inner,) = [p for p in target.iterdir() if p.is_dir()]
        for p in inner.iterdir():
            p.rename(target / p.name)
        inner.rmdir()


@pytest.mark.parametrize("flatten", [False, True], ids=["nested", "flat"])
@pytest.mark.parametrize("n_files", [1, 2])
def test_meta_unzipped_directories_load_equal(tmp_path, n_files, flatten):
    weights = random_weights(ARGS, dtype=torch.bfloat16, seed=5)
    src = write_meta(tmp_path / "zipped", weights, n_files=n_files, views=True)
    _, loaded = load_all(src, torch.bfloat16)
    assert_same(loaded, weights)
    d = tmp_path / "unzipped"
    d.mkdir()
    shutil.copy(src / "params.json", d)
    for i in range(n_files):
        unzip_pth(src / f"consolidated.{i:02d}.pth", d / f"consolidated.{i:02d}", flatten)
    assert not list(d.glob("*.pth"))
    ckpt, loaded = load_all(d, torch.bfloat16)
    assert ckpt.format == "meta" and ckpt.args == ARGS
    assert_same(loaded, weights)
    # Naming the folder itself works too.
    _, loaded = load_all(d / "consolidated.00", torch.bfloat16)
    assert_same(loaded, weights)


class _Evil:
    def __reduce__(self):
        return (os.system, ("echo owned",))


def test_meta_unzipped_refuses_arbitrary_classes(tmp_path):
    d = tmp_path / "consolidated.00"
    d.mkdir()
    (d / "data.pkl").write_bytes(pickle.dumps({"tok_embeddings.weight": _Evil()}, protocol=2))
    (tmp_path / "params.json").write_text(json.dumps(PARAMS))
    with pytest.raises(ModelFileError, match=r"data\.pkl.*(posix|os)\.system"):
        open_checkpoint(tmp_path)


class _Storage:
    """Stands for a storage in :func:`_write_unzipped`: the pickler writes its key as torch.save would."""

    def __init__(self, key: str, numel: int):
        self.key, self.numel = key, numel


class _Tensor:
    def __init__(self, storage: _Storage):
        self.storage = storage

    def __reduce__(self):
        n = self.storage.numel
        return (torch._utils._rebuild_tensor_v2, (self.storage, 0, (n,), (1,), False, collections.OrderedDict()))


def _write_unzipped(folder: Path, key: str, numel: int = 4) -> None:
    """A data.pkl whose one tensor's storage is ``data/<key>``, exactly as torch.save lays out the pickle."""

    class Pickler(pickle.Pickler):
        def persistent_id(self, obj):
            if isinstance(obj, _Storage):
                return ("storage", torch.FloatStorage, obj.key, "cpu", obj.numel)
            return None

    folder.mkdir(parents=True)
    (folder / "data").mkdir()
    with open(folder / "data.pkl", "wb") as f:
        Pickler(f, protocol=2).dump({"tok_embeddings.weight": _Tensor(_Storage(key, numel))})


def test_meta_unzipped_reads_a_crafted_pickle(tmp_path):
    """The crafted pickle below is what torch.save writes: with a plain key it loads."""
    from shardllama.loading.unzipped import load_unzipped

    _write_unzipped(tmp_path / "ok", "0")
    torch.arange(4, dtype=torch.float32).numpy().tofile(tmp_path / "ok" / "data" / "0")
    assert torch.equal(load_unzipped(tmp_path / "ok")["tok_embeddings.weight"], torch.arange(4.0))


@pytest.mark.parametrize("key", ["../../secret", "../secret", "/tmp/secret", "..", "a/../../secret", "link"])
def test_meta_unzipped_storage_keys_stay_inside_data(tmp_path, key):
    """A storage key that leaves data/ (.., an absolute path, a symlink out) would map any readable file."""
    from shardllama.loading.unzipped import load_unzipped

    secret = tmp_path / "secret"
    torch.ones(64).numpy().tofile(secret)
    folder = tmp_path / "m" / "consolidated.00"
    _write_unzipped(folder, key)
    (folder / "data" / "link").symlink_to(secret)
    with pytest.raises(ModelFileError, match="storage key") as e:
        load_unzipped(folder)
    assert str(folder / "data.pkl") in str(e.value) and repr(key) in str(e.value)


def test_load_weights_progress_bar_goes_to_stderr(tmp_path, capsys):
    d = write_meta(tmp_path, random_weights(ARGS))
    with open_checkpoint(d) as ckpt:
        load_weights(ckpt, torch.float32, progress=True)
    out, err = capsys.readouterr()
    assert out == "" and "loading" in err


# ---- HF safetensors ----------------------------------------------------------------------------------


@pytest.mark.parametrize("n_kv_heads, tied", [(8, False), (2, False), (2, True)], ids=["mha", "gqa", "gqa-tied"])
def test_hf_sharded_safetensors_match_transformers_logits(tmp_path, n_kv_heads, tied):
    transformers = pytest.importorskip("transformers")
    config = transformers.LlamaConfig(
        vocab_size=100, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=8,
        num_key_value_heads=n_kv_heads, max_position_embeddings=64, rms_norm_eps=1e-5, rope_theta=10000.0,
        tie_word_embeddings=tied,
        initializer_range=0.2,  # large weights: peaked attention, so a wrong q/k layout cannot hide
    )
    torch.manual_seed(0)
    hf = transformers.LlamaForCausalLM(config).eval()
    hf.save_pretrained(tmp_path, max_shard_size="40KB")
    assert (tmp_path / "model.safetensors.index.json").is_file()
    assert len(list(tmp_path.glob("*.safetensors"))) > 2

    ckpt, weights = load_all(tmp_path)
    assert ckpt.format == "safetensors"
    assert (ckpt.args.n_kv_heads, ckpt.args.tie_embeddings) == (n_kv_heads, tied)
    model = Transformer(ckpt.args, weights)
    tokens = torch.tensor([[1, 17, 42, 99, 3, 3, 64, 8, 0, 55, 21, 70]])
    ours = model.forward(tokens, seq_cache(model), all_logits=True)
    with torch.no_grad():
        ref = hf(tokens).logits
    assert ref.abs().max() > 1.0
    torch.testing.assert_close(ours, ref, rtol=1e-4, atol=1e-4)


def test_hf_naming_one_shard_opens_the_set(tmp_path):
    transformers = pytest.importorskip("transformers")
    config = transformers.LlamaConfig(vocab_size=100, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                      num_attention_heads=8, num_key_value_heads=2)
    transformers.LlamaForCausalLM(config).save_pretrained(tmp_path, max_shard_size="40KB")
    a = load_all(tmp_path)[1]
    b = load_all(sorted(tmp_path.glob("*.safetensors"))[-1])[1]
    c = load_all(tmp_path / "model.safetensors.index.json")[1]
    assert_same(b, a)
    assert_same(c, a)


def test_hf_single_file_round_trips_exactly(tmp_path):
    weights = random_weights(ARGS, seed=6)
    d = write_hf(tmp_path, weights, extra={"model.layers.0.self_attn.rotary_emb.inv_freq": torch.ones(4)})
    (d / "tokenizer.json").write_text("{}")
    ckpt, loaded = load_all(d)
    assert ckpt.args.replace(max_seq_len=ARGS.max_seq_len) == ARGS
    assert ckpt.native_dtype == torch.float32
    assert ckpt.tokenizer_path == d / "tokenizer.json"
    assert_same(loaded, weights)
    _, loaded = load_all(d / "model.safetensors", torch.bfloat16)
    assert_same(loaded, {k: v.bfloat16() for k, v in weights.items()})


def test_hf_tied_model_ignores_a_stored_lm_head(tmp_path):
    args = ARGS.replace(tie_embeddings=True)
    weights = random_weights(args, dtype=torch.bfloat16, seed=7)
    d = write_hf(tmp_path, weights, args, extra={"lm_head.weight": weights["tok_embeddings.weight"].clone()})
    ckpt, loaded = load_all(d, torch.bfloat16)
    assert ckpt.args.tie_embeddings and ckpt.native_dtype == torch.bfloat16
    assert_same(loaded, weights)


# ---- GGUF --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("qtype", [Q.F32, Q.F16, Q.BF16, Q.Q8_0, Q.Q4_0, Q.Q4_1], ids=lambda q: q.name)
@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
def test_gguf_tensor_types_load_the_written_values(tmp_path, qtype, tied):
    args = ARGS.replace(tie_embeddings=tied)
    weights = random_weights(args, seed=8)
    path = write_gguf(tmp_path / "tiny.gguf", weights, args, qtype)
    ckpt, loaded = load_all(path)
    assert ckpt.format == "gguf" and ckpt.path == path and ckpt.tokenizer_path == path
    assert ckpt.args.norm_eps == pytest.approx(args.norm_eps)  # stored as f32
    assert ckpt.args.replace(max_seq_len=args.max_seq_len, norm_eps=args.norm_eps) == args
    assert ckpt.names() == list(expected_shapes(args))
    assert ckpt.native_dtype == {Q.F16: torch.float16, Q.BF16: torch.bfloat16}.get(qtype, torch.float32)
    for name, w in weights.items():
        got = loaded[name]
        assert got.dtype == torch.float32 and got.shape == w.shape, name
        if w.ndim == 1 or qtype == Q.F32:
            want = w
        elif qtype == Q.F16:
            want = w.half().float()
        elif qtype == Q.BF16:
            want = w.bfloat16().float()
        else:
            want = torch.from_numpy(gguf.quants.dequantize(gguf.quants.quantize(w.numpy(), qtype), qtype))
        assert torch.equal(got, want), name
        # ...and the dequantized values are near the originals, so rows and columns are where they belong.
        assert (got - w).abs().max() <= 0.15 * w.abs().max(), name


def test_gguf_fields_are_plain_python(tmp_path):
    path = write_gguf(tmp_path / "tiny.gguf", random_weights(ARGS), ARGS, Q.F16)
    with open_checkpoint(tmp_path) as ckpt:
        f = ckpt.gguf_fields
    assert f["general.architecture"] == "llama"
    assert f["tokenizer.ggml.model"] == "llama"
    assert f["llama.block_count"] == 2 and isinstance(f["llama.block_count"], int)
    assert f["tokenizer.ggml.tokens"][:3] == ["<unk>", "<s>", "</s>"] and len(f["tokenizer.ggml.tokens"]) == 100
    assert f["tokenizer.ggml.scores"][3:5] == [0.0, -1.0] and isinstance(f["tokenizer.ggml.scores"][4], float)
    assert f["tokenizer.ggml.token_type"][:4] == [2, 3, 3, 1]
    assert ckpt.tokenizer_path == path


def test_gguf_float_tensors_are_writable_without_touching_the_file(tmp_path):
    weights = random_weights(ARGS, seed=9)
    path = write_gguf(tmp_path / "tiny.gguf", weights, ARGS, Q.F32)
    before = path.read_bytes()
    with open_checkpoint(path) as ckpt:
        t = ckpt.load("layers.0.attention.wq.weight", torch.float32)
    t.zero_()
    assert path.read_bytes() == before


@pytest.mark.slow  # the real demo model (SmolLM2-135M, Q4_1; conftest's demo_gguf) against transformers: ~20 s
def test_demo_gguf_matches_transformers_logits(demo_gguf, hf_demo):
    """transformers un-permutes q/k when it reads GGUF; we do not.  Equal logits prove GGUF is Meta layout."""
    ckpt, weights = load_all(demo_gguf)
    assert ckpt.native_dtype == torch.float32  # Q4_1 dequantizes to f32
    assert ckpt.args.tie_embeddings and ckpt.args.n_kv_heads < ckpt.args.n_heads
    assert ckpt.gguf_fields["tokenizer.ggml.model"] == "gpt2"
    model = Transformer(ckpt.args, weights, max_seq_len=64)
    tokens = torch.tensor([[1, 504, 3458, 282, 4649, 314, 253, 1345, 30, 2]])
    ours = model.forward(tokens, seq_cache(model), all_logits=True)
    with torch.no_grad():
        ref = hf_demo(tokens).logits
    torch.testing.assert_close(ours, ref, rtol=1e-3, atol=1e-3 * float(ref.abs().max()))
    assert torch.equal(ours.argmax(-1), ref.argmax(-1))


# ---- errors ------------------------------------------------------------------------------------------

# One writer per format, for the error paths they share: (directory, Meta-named weights) -> file written.
WRITERS: dict[str, Callable[[Path, dict], Path]] = {
    "meta": lambda d, w: write_meta(d, w) / "consolidated.00.pth",
    "safetensors": lambda d, w: write_hf(d, w) / "model.safetensors",
    "gguf": lambda d, w: write_gguf(d / "tiny.gguf", w),
}
# A tensor each format does not know, in its own naming.
UNKNOWN = {"meta": "layers.0.attention.wq.bias", "safetensors": "model.layers.0.self_attn.q_proj.bias", "gguf": "blk.0.attn_q.bias"}


@pytest.mark.parametrize("fmt", WRITERS)
def test_truncated_file_is_a_model_file_error(tmp_path, fmt):
    path = WRITERS[fmt](tmp_path, random_weights(ARGS))
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ModelFileError, match=esc(path)):
        load_all(tmp_path)


@pytest.mark.parametrize("fmt", WRITERS)
def test_shape_mismatch_names_the_tensor(tmp_path, fmt):
    weights = random_weights(ARGS)
    weights["layers.1.attention.wk.weight"] = torch.randn(24, 64)
    WRITERS[fmt](tmp_path, weights)
    with pytest.raises(ModelFileError, match=r"(wk|k_proj|attn_k).*\(24, 64\), expected \(16, 64\)"):
        load_all(tmp_path)


@pytest.mark.parametrize("fmt", WRITERS)
def test_missing_tensor_is_named(tmp_path, fmt):
    weights = random_weights(ARGS)
    del weights["layers.1.feed_forward.w3.weight"]
    path = WRITERS[fmt](tmp_path, weights)
    with pytest.raises(ModelFileError, match=rf"{esc(path)}: missing tensor .*(w3|up_proj|ffn_up)"):
        load_all(tmp_path)


@pytest.mark.parametrize("fmt", WRITERS)
def test_unknown_tensor_is_named(tmp_path, fmt):
    weights = random_weights(ARGS)
    path = {
        "meta": lambda: write_meta(tmp_path, weights, extra={UNKNOWN["meta"]: torch.zeros(64)}) / "consolidated.00.pth",
        "safetensors": lambda: write_hf(tmp_path, weights, extra={UNKNOWN["safetensors"]: torch.zeros(64)}) / "model.safetensors",
        "gguf": lambda: write_gguf(tmp_path / "tiny.gguf", {**weights, UNKNOWN["gguf"]: np.zeros(64, np.float32)}),
    }[fmt]()
    with pytest.raises(ModelFileError, match=rf"{esc(path)}: unknown tensor '{UNKNOWN[fmt]}'"):
        load_all(tmp_path)


@pytest.mark.parametrize("fmt", WRITERS)
def test_extra_layer_is_an_unknown_tensor(tmp_path, fmt):
    WRITERS[fmt](tmp_path, random_weights(ARGS.replace(n_layers=3)))  # the config still says 2 layers
    with pytest.raises(ModelFileError, match=r"unknown tensor '(model\.)?(layers|blk)\.2\."):
        load_all(tmp_path)


def test_missing_path(tmp_path):
    with pytest.raises(ModelFileError, match="nothing-here"):
        open_checkpoint(tmp_path / "nothing-here")


def test_directory_without_weights(tmp_path):
    (tmp_path / "params.json").write_text("{}")
    with pytest.raises(ModelFileError, match=rf"{esc(tmp_path)}: no model weights"):
        open_checkpoint(tmp_path)


def test_unrecognised_file(tmp_path):
    (tmp_path / "weights.bin").write_bytes(b"\0" * 64)
    with pytest.raises(ModelFileError, match="weights.bin"):
        open_checkpoint(tmp_path / "weights.bin")


def test_missing_params_json(tmp_path):
    write_meta(tmp_path, random_weights(ARGS))
    (tmp_path / "params.json").unlink()
    with pytest.raises(ModelFileError, match=r"params\.json: file not found"):
        open_checkpoint(tmp_path)


def test_param_path_overrides_the_default(tmp_path):
    write_meta(tmp_path / "w", random_weights(ARGS))
    (tmp_path / "w" / "params.json").rename(tmp_path / "my-params.json")
    assert open_checkpoint(tmp_path / "w", tmp_path / "my-params.json").args == ARGS


def test_bad_params_json_names_the_file(tmp_path):
    write_meta(tmp_path, random_weights(ARGS), params={"dim": 64, "n_layers": 2})
    with pytest.raises(ModelFileError, match=rf"{esc(tmp_path / 'params.json')}.*n_heads"):
        open_checkpoint(tmp_path)


def test_missing_config_json(tmp_path):
    write_hf(tmp_path, random_weights(ARGS))
    (tmp_path / "config.json").unlink()
    with pytest.raises(ModelFileError, match=r"config\.json: file not found"):
        open_checkpoint(tmp_path)


def test_missing_safetensors_shard(tmp_path):
    transformers = pytest.importorskip("transformers")
    config = transformers.LlamaConfig(vocab_size=100, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                      num_attention_heads=8, num_key_value_heads=2)
    transformers.LlamaForCausalLM(config).save_pretrained(tmp_path, max_shard_size="40KB")
    victim = sorted(tmp_path.glob("*.safetensors"))[1]
    victim.unlink()
    with pytest.raises(ModelFileError, match=rf"{esc(victim)}: file not found"):
        open_checkpoint(tmp_path)


def test_split_files_with_a_gap(tmp_path):
    write_meta(tmp_path, random_weights(ARGS), n_files=4)
    (tmp_path / "consolidated.02.pth").unlink()
    with pytest.raises(ModelFileError, match=r"missing consolidated\.02\.pth"):
        open_checkpoint(tmp_path)


def test_split_files_that_disagree_on_a_shape(tmp_path):
    weights = random_weights(ARGS)
    write_meta(tmp_path, weights, n_files=2)
    shard = torch.load(tmp_path / "consolidated.01.pth", weights_only=True)
    shard["layers.0.feed_forward.w1.weight"] = torch.zeros(40, 64)
    torch.save(shard, tmp_path / "consolidated.01.pth")
    with pytest.raises(ModelFileError, match=r"consolidated\.01\.pth: piece of 'layers\.0\.feed_forward\.w1\.weight'"):
        open_checkpoint(tmp_path)


def test_split_files_that_disagree_on_names(tmp_path):
    write_meta(tmp_path, random_weights(ARGS), n_files=2)
    shard = torch.load(tmp_path / "consolidated.01.pth", weights_only=True)
    del shard["norm.weight"]
    torch.save(shard, tmp_path / "consolidated.01.pth")
    with pytest.raises(ModelFileError, match=r"consolidated\.01\.pth: holds a different set of tensors.*norm\.weight"):
        open_checkpoint(tmp_path)


def test_split_files_whose_replicated_norms_differ(tmp_path):
    write_meta(tmp_path, random_weights(ARGS), n_files=2)
    shard = torch.load(tmp_path / "consolidated.01.pth", weights_only=True)
    shard["layers.1.ffn_norm.weight"] += 1
    torch.save(shard, tmp_path / "consolidated.01.pth")
    with open_checkpoint(tmp_path) as ckpt:
        with pytest.raises(ModelFileError, match=r"consolidated\.01\.pth: replicated tensor 'layers\.1\.ffn_norm\.weight'"):
            load_weights(ckpt, torch.float32)


def test_gguf_unsupported_quant_type_names_tensor_and_type(tmp_path):
    # Q8_1 (llama.cpp's activation format, never a weight's) is a type gguf 0.19 cannot dequantize:
    # 96 values per row = 3 blocks of 40 bytes.
    weights = {**random_weights(ARGS), "blk.1.ffn_down.weight": np.zeros((ARGS.dim, 3 * 40), np.uint8)}
    del weights["layers.1.feed_forward.w2.weight"]  # replaced by the Q8_1 bytes
    with pytest.raises(NotImplementedError):
        gguf.quants.dequantize(np.zeros((1, 40), np.uint8), Q.Q8_1)
    path = write_gguf(tmp_path / "tiny.gguf", weights, ARGS, Q.F16, types={"blk.1.ffn_down.weight": Q.Q8_1})
    with pytest.raises(UnsupportedError, match=rf"{esc(path)}: tensor 'blk\.1\.ffn_down\.weight' has unsupported type Q8_1"):
        open_checkpoint(path)


def test_gguf_unsupported_architecture(tmp_path):
    path = write_gguf(tmp_path / "tiny.gguf", random_weights(ARGS), arch="qwen2")
    with pytest.raises(UnsupportedError, match=rf"{esc(path)}: unsupported architecture 'qwen2'"):
        open_checkpoint(path)


def test_hf_unsupported_architecture(tmp_path):
    d = write_hf(tmp_path, random_weights(ARGS))
    (d / "config.json").write_text(json.dumps(hf_config(ARGS, architectures=["MistralForCausalLM"], model_type="mistral")))
    with pytest.raises(UnsupportedError, match=r"config\.json: unsupported architecture 'MistralForCausalLM'"):
        open_checkpoint(d)


def test_directory_with_two_ggufs(tmp_path):
    write_gguf(tmp_path / "a.gguf", random_weights(ARGS))
    shutil.copy(tmp_path / "a.gguf", tmp_path / "b.gguf")
    with pytest.raises(ModelFileError, match=r"2 \.gguf files"):
        open_checkpoint(tmp_path)
    assert open_checkpoint(tmp_path / "b.gguf").format == "gguf"


def test_directory_with_two_formats(tmp_path):
    weights = random_weights(ARGS)
    write_meta(tmp_path, weights)
    write_gguf(tmp_path / "tiny.gguf", weights)
    with pytest.raises(ModelFileError, match="several checkpoints"):
        open_checkpoint(tmp_path)
