"""Write GGUF files that both llama.cpp and shardllama load: random LLaMA-shaped weights, or a float copy of a
quantized file.

    python tools/make_gguf.py random --shape 7b --dtype f16 -o llama-7b-random-f16.gguf    # 13.5 GB, ~3 min
    python tools/make_gguf.py random --shape tiny -o tiny.gguf
    python tools/make_gguf.py random --dim 512 --layers 4 --heads 8 --kv-heads 2 --ffn 1376 -o small.gguf
    python tools/make_gguf.py dequantize SmolLM2-135M-Instruct.Q4_1.gguf --dtype f16 -o smollm2-f16.gguf

``random``: a LLaMA of the named shape (``--dim`` etc. override single fields) with weights drawn by
``shardllama.model.random_weight`` -- seeded by ``--seed`` and the tensor's name, so the same file comes out
every time and ``tools/scaling.py --shape`` times the very same weights: matrices normal with std 0.02
(embeddings std 1), norms around 1, which keeps activations and logits finite in f16.  The vocabulary is a
SentencePiece-style ``llama`` one (:func:`llama_vocab`): ``<unk>``, ``<s>``, ``</s>``, the 256 ``<0xNN>``
byte tokens, then pieces made of ASCII characters with scores, so any text tokenizes (bytes fall back)
and both engines read it with their ``llama`` tokenizer.

``dequantize``: every matrix rewritten as f16 or f32 (``gguf.quants.dequantize``), 1-D tensors (norms) kept
f32 as llama.cpp's converter does; every metadata key is copied (vocabulary, merges, chat template), only
``general.file_type`` changes.  The demo model ships as Q4_1, which llama-cpp-python 0.3.36 crashes on;
its f16/f32 copies load in both engines and give shardllama the same greedy text as the Q4_1 file.

Both modes declare every tensor first and then write one tensor at a time, so a 13.5 GB model never sits in
memory (the largest tensor, 7B's embeddings, takes ~0.8 GB while it is written).
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable, Iterable
from pathlib import Path

import numpy as np

# Run as a script, this file's directory comes first on sys.path: put the checkout it belongs to ahead of any
# installed shardllama, so the tool writes what this checkout's loaders read.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import gguf  # noqa: E402
import torch  # noqa: E402
from gguf import GGMLQuantizationType as Q  # noqa: E402
from gguf.quants import dequantize as gguf_dequantize  # noqa: E402

from shardllama.config import ModelArgs  # noqa: E402
from shardllama.errors import ShardllamaError  # noqa: E402
from shardllama.loading.base import layer_table  # noqa: E402
from shardllama.loading.gguf_file import GGUF_NAMES  # noqa: E402
from shardllama.model import expected_shapes, random_weight  # noqa: E402

# The LLaMA family's shapes (Meta's params.json, FFN width as Meta computes it), and a tiny one for tests:
# GQA (2 KV heads for 4 query heads) so that path is exercised too.
SHAPES = {
    "tiny": dict(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, hidden_dim=176, vocab_size=32000),
    "7b": dict(dim=4096, n_layers=32, n_heads=32, n_kv_heads=32, hidden_dim=11008, vocab_size=32000),
    "13b": dict(dim=5120, n_layers=40, n_heads=40, n_kv_heads=40, hidden_dim=13824, vocab_size=32000),
    "30b": dict(dim=6656, n_layers=60, n_heads=52, n_kv_heads=52, hidden_dim=17920, vocab_size=32000),
    "65b": dict(dim=8192, n_layers=80, n_heads=64, n_kv_heads=64, hidden_dim=22016, vocab_size=32000),
}

# Output precisions: numpy type and the file_type llama.cpp records ("all F32", "mostly F16").
OUT_TYPES = {"f32": (np.float32, gguf.LlamaFileType.ALL_F32), "f16": (np.float16, gguf.LlamaFileType.MOSTLY_F16)}

# llama.cpp's token types (llama_token_type), as gguf.TokenType spells them.
T = gguf.TokenType
NORMAL, UNKNOWN, CONTROL, BYTE = T.NORMAL, T.UNKNOWN, T.CONTROL, T.BYTE


# ---- the vocabulary ---------------------------------------------------------------------------------------


def llama_vocab(size: int = 32000) -> tuple[list[str], list[float], list[int]]:
    """A SentencePiece-style vocabulary of ``size`` tokens laid out as LLaMA's: ids 0-2 ``<unk>``, ``<s>``,
    ``</s>``; 3-258 the byte tokens ``<0x00>``..``<0xFF>``; then normal pieces, best score first.

    The pieces are deterministic, not learned: every printable ASCII character and ``▁`` (SentencePiece's
    space), then ``▁`` + letter/digit, two-letter pairs, ``▁`` + two letters, three lowercase letters,
    ``▁`` + three lowercase letters, ... until ``size``.  Each piece of length n is a piece of length
    n - 1 plus one character, so BPE by score (what llama.cpp runs) can build every one of them.
    """
    specials = ["<unk>", "<s>", "</s>"]
    if size < len(specials) + 256 + 1:
        raise ValueError(f"a llama vocabulary needs at least 260 tokens (3 special, 256 bytes, one piece), got {size}")
    lower = [chr(c) for c in range(ord("a"), ord("z") + 1)]
    upper = [c.upper() for c in lower]
    digits = [str(d) for d in range(10)]

    def pieces() -> Iterable[str]:
        yield "▁"
        yield from (chr(c) for c in range(33, 127))  # printable ASCII; the space is '▁'
        yield from ("▁" + c for c in lower + upper + digits)
        yield from (a + b for a in lower for b in lower)
        yield from (a + b for a in upper for b in lower)
        yield from ("▁" + a + b for a in lower + upper for b in lower)
        yield from (a + b + c for a in lower for b in lower for c in lower)
        yield from ("▁" + a + b + c for a in lower + upper for b in lower for c in lower)

    normal: list[str] = []
    for p in pieces():
        if len(specials) + 256 + len(normal) == size:
            break
        normal.append(p)
    else:
        raise ValueError(f"llama_vocab makes at most {len(specials) + 256 + len(normal)} tokens, asked for {size}")
    tokens = specials + [f"<0x{b:02X}>" for b in range(256)] + normal
    scores = [0.0] * (len(specials) + 256) + [-float(i) for i in range(len(normal))]
    types = [UNKNOWN, CONTROL, CONTROL] + [BYTE] * 256 + [NORMAL] * len(normal)
    return tokens, scores, [int(t) for t in types]


# ---- writing ------------------------------------------------------------------------------------------


def write_gguf(path: Path, writer: gguf.GGUFWriter, tensors: list[tuple[str, tuple[int, ...], np.dtype]],
               make: Callable[[str], np.ndarray], progress: bool = True) -> None:
    """Declare every tensor ``(GGUF name, numpy shape (out, in), dtype)``, write header, metadata and tensor
    infos, then each tensor's data from ``make(name)``, one at a time."""
    for name, shape, dtype in tensors:
        writer.add_tensor_info(name, shape, np.dtype(dtype), int(np.prod(shape)) * np.dtype(dtype).itemsize)
    from tqdm import tqdm

    tmp = path.with_name(path.name + ".partial")  # a stopped run never leaves a file that looks complete
    total = sum(int(np.prod(s)) * np.dtype(d).itemsize for _, s, d in tensors)
    try:
        writer.write_header_to_file(tmp)
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        with tqdm(total=total, unit="B", unit_scale=True, desc=f"writing {path.name}", file=sys.stderr,
                  disable=not progress) as bar:
            for name, shape, dtype in tensors:
                data = np.ascontiguousarray(make(name), dtype=dtype)
                assert data.shape == tuple(shape), (name, data.shape, shape)
                writer.write_tensor_data(data)
                bar.update(data.nbytes)
                del data
        writer.close()
        tmp.replace(path)
    finally:
        writer.close()
        tmp.unlink(missing_ok=True)


def random_args(shape: str = "7b", **overrides) -> ModelArgs:
    """ModelArgs of a named shape with single fields overridden (``None`` values are ignored)."""
    fields = {**SHAPES[shape], **{k: v for k, v in overrides.items() if v is not None}}
    return ModelArgs(**fields)


def write_random(path: str | Path, args: ModelArgs, dtype: str = "f16", seed: int = 0, name: str | None = None,
                 progress: bool = True) -> Path:
    """A GGUF of LLaMA shape ``args`` with random weights and a :func:`llama_vocab` vocabulary."""
    path = Path(path)
    np_type, file_type = OUT_TYPES[dtype]
    w = gguf.GGUFWriter(None, "llama")
    w.add_name(name or f"random LLaMA dim {args.dim} x {args.n_layers} layers")
    w.add_description(f"random weights (shardllama tools/make_gguf.py, seed {seed}); for benchmarks only")
    w.add_context_length(args.max_seq_len)
    w.add_embedding_length(args.dim)
    w.add_block_count(args.n_layers)
    w.add_feed_forward_length(args.hidden_dim)
    w.add_head_count(args.n_heads)
    w.add_head_count_kv(args.n_kv_heads)
    w.add_rope_dimension_count(args.head_dim)
    w.add_rope_freq_base(args.rope_theta)
    w.add_layer_norm_rms_eps(args.norm_eps)
    w.add_vocab_size(args.vocab_size)
    w.add_file_type(file_type)
    tokens, scores, types = llama_vocab(args.vocab_size)
    w.add_tokenizer_model("llama")
    w.add_token_list(tokens)
    w.add_token_scores(scores)
    w.add_token_types(types)
    w.add_unk_token_id(0)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_add_bos_token(True)
    w.add_add_eos_token(False)

    to_gguf = {meta: name for name, meta in layer_table(GGUF_NAMES, args.n_layers).items()}
    shapes = expected_shapes(args)
    to_meta = {to_gguf[m]: m for m in shapes}
    # Norms stay f32 in every llama.cpp float file; matrices take the asked precision.
    tensors = [(to_gguf[m], s, np.float32 if len(s) == 1 else np_type) for m, s in shapes.items()]
    make = lambda n: random_weight(args, to_meta[n], torch.float32, seed).numpy()  # noqa: E731
    write_gguf(path, w, tensors, make, progress)
    return path


def write_dequantized(src: str | Path, dst: str | Path, dtype: str = "f16", progress: bool = True) -> Path:
    """A copy of GGUF ``src`` with every matrix as ``dtype`` (1-D tensors as f32) and the same metadata."""
    src, dst = Path(src), Path(dst)
    if src.resolve() == dst.resolve():
        raise ValueError(f"{dst}: would overwrite its own source")
    np_type, file_type = OUT_TYPES[dtype]
    reader = gguf.GGUFReader(src, "r")
    arch = reader.fields["general.architecture"].contents()
    w = gguf.GGUFWriter(None, arch)
    for key, field in reader.fields.items():
        # GGUF.* are the header's own entries; the writer adds the architecture and its alignment itself.
        if key.startswith("GGUF.") or key in ("general.architecture", "general.alignment"):
            continue
        value = file_type if key == "general.file_type" else field.contents()
        sub_type = field.types[-1] if field.types[0] == gguf.GGUFValueType.ARRAY else None
        w.add_key_value(key, value, field.types[0], sub_type=sub_type)
    if "general.file_type" not in reader.fields:
        w.add_file_type(file_type)

    by_name = {t.name: t for t in reader.tensors}
    tensors = []
    for t in reader.tensors:
        shape = tuple(int(d) for d in reversed(t.shape.tolist()))  # GGUF lists dims innermost first
        tensors.append((t.name, shape, np.float32 if len(shape) == 1 else np_type))

    def make(name: str) -> np.ndarray:
        t = by_name[name]
        shape = tuple(int(d) for d in reversed(t.shape.tolist()))
        if t.tensor_type in (Q.F32, Q.F16):
            return np.asarray(t.data).reshape(shape)
        return gguf_dequantize(t.data, t.tensor_type).reshape(shape)  # quantized and BF16 -> f32

    write_gguf(dst, w, tensors, make, progress)
    return dst


# ---- command line ---------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    r = sub.add_parser("random", help="random weights of a LLaMA shape")
    r.add_argument("--shape", choices=SHAPES, default="7b")
    r.add_argument("--dim", type=int)
    r.add_argument("--layers", type=int, dest="n_layers")
    r.add_argument("--heads", type=int, dest="n_heads")
    r.add_argument("--kv-heads", type=int, dest="n_kv_heads", help="default: as --heads (or the shape's)")
    r.add_argument("--ffn", type=int, dest="hidden_dim")
    r.add_argument("--vocab", type=int, dest="vocab_size")
    r.add_argument("--context", type=int, dest="max_seq_len", default=2048)
    r.add_argument("--seed", type=int, default=0)
    r.add_argument("--dtype", choices=OUT_TYPES, default="f16")
    r.add_argument("-o", "--output", type=Path, required=True)
    d = sub.add_parser("dequantize", help="a float copy of a (quantized) GGUF, metadata unchanged")
    d.add_argument("input", type=Path)
    d.add_argument("--dtype", choices=OUT_TYPES, default="f16")
    d.add_argument("-o", "--output", type=Path, required=True)
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    a = p.parse_args(argv)

    t = time.perf_counter()
    try:
        if a.command == "random":
            if a.n_heads is not None and a.n_kv_heads is None:
                a.n_kv_heads = a.n_heads
            args = random_args(a.shape, dim=a.dim, n_layers=a.n_layers, n_heads=a.n_heads, n_kv_heads=a.n_kv_heads,
                               hidden_dim=a.hidden_dim, vocab_size=a.vocab_size, max_seq_len=a.max_seq_len)
            write_random(a.output, args, a.dtype, a.seed, progress=not a.quiet)
        else:
            write_dequantized(a.input, a.output, a.dtype, progress=not a.quiet)
    except (OSError, ValueError, ShardllamaError) as e:
        print(f"make_gguf: {e}", file=sys.stderr)
        return 1
    size = a.output.stat().st_size
    print(f"{a.output}: {size / 1e9:.2f} GB in {time.perf_counter() - t:.0f} s", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
