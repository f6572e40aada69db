"""The GGUF files tools/bench_llamacpp.py and tools/quality.py run: names, how each is made, its tensor bytes.

``demo-f16`` / ``demo-f32`` are the demo model (SmolLM2-135M-Instruct, shipped as Q4_1) rewritten with every
matrix dequantized; ``7b-f16`` is a random-weight LLaMA-7B (dim 4096, 32 layers, FFN 11008, vocab 32000;
13.5 GB).  ``demo-q4_0``, ``demo-q4_k_m``, ``demo-q8_0``, ``7b-q4_k_m``... (Q4_0, Q4_K_M, Q5_K_M, Q8_0) are
those f16 files quantized by llama.cpp's own quantizer (``llama_cpp.llama_model_quantize``, the ``bench``
extra), so both engines read exactly what people download.  A file is written on first use into
``~/.cache/shardllama/bench/`` (``$SHARDLLAMA_CACHE``); a path to any llama GGUF works too.

Made on the Intel kind (2 vCPUs, shared, niced) on 2026-12-03 by llama-cpp-python 0.3.36: the demo's Q4_0,
Q4_K_M and Q8_0 in 2-4 s each; the 7B's Q4_0 in 97 s (3.83 GB), Q4_K_M in 720 s (4.08 GB: the K-quants'
search for scales is the slow part) and Q8_0 in 81 s (7.16 GB); the 7B f16 file itself ~3 minutes
(tools/make_gguf.py).  llama.cpp keeps some tensors at other types (the demo's 576-wide rows are not whole
256-weight blocks, so its "Q4_K_M" is mostly Q5_0): :func:`tensor_types` says what a file holds.
"""

from __future__ import annotations

import os
import sys
from collections import Counter
from pathlib import Path

MODELS = {  # name -> (how to make it, file name in the bench cache)
    "demo-f16": ("demo", "f16", "SmolLM2-135M-Instruct.f16.gguf"),
    "demo-f32": ("demo", "f32", "SmolLM2-135M-Instruct.f32.gguf"),
    "7b-f16": ("7b", "f16", "llama-7b-random-f16.gguf"),
    "7b-f32": ("7b", "f32", "llama-7b-random-f32.gguf"),  # 27 GB: does not fit a 24 GB machine's memory
}
# Quantized files, made from the f16 ones by llama.cpp's own quantizer (llama_model_quantize), so both
# engines read exactly what people download: name -> (f16 source, llama.cpp ftype name, file name).
QUANTIZED = {"Q4_0": "MOSTLY_Q4_0", "Q4_K_M": "MOSTLY_Q4_K_M", "Q5_K_M": "MOSTLY_Q5_K_M", "Q8_0": "MOSTLY_Q8_0"}
for _src, _stem in (("demo", "SmolLM2-135M-Instruct"), ("7b", "llama-7b-random")):
    for _q in QUANTIZED:
        MODELS[f"{_src}-{_q.lower()}"] = (f"{_src}-f16", _q, f"{_stem}-{_q}.gguf")


def bench_dir() -> Path:
    from shardllama.demo import cache_dir

    return cache_dir() / "bench"


def model_path(name: str) -> Path:
    """The GGUF for a model name (written on first use) or a path given as is."""
    if name not in MODELS:
        path = Path(name).expanduser()
        if not path.is_file():
            raise SystemExit(f"{name}: neither a model name ({', '.join(MODELS)}) nor a file")
        return path
    source, dtype, file_name = MODELS[name]
    path = bench_dir() / file_name
    if path.is_file():
        return path
    import make_gguf  # tools/, beside this file

    path.parent.mkdir(parents=True, exist_ok=True)
    print(f"writing {path} (once)", file=sys.stderr)
    if source.endswith("-f16"):  # a quantized file, from the f16 one
        return quantize(model_path(source), path, dtype)
    if source == "demo":
        from shardllama.demo import demo_model_path

        return make_gguf.write_dequantized(demo_model_path(), path, dtype)
    return make_gguf.write_random(path, make_gguf.random_args(source), dtype, seed=0,
                                  name=f"random LLaMA-{source} shape")


def quantize(src: Path, dst: Path, qtype: str) -> Path:
    """``src`` quantized to ``qtype`` (a QUANTIZED key) by llama.cpp's own quantizer, written atomically."""
    import ctypes

    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, "LLAMA_FTYPE_" + QUANTIZED[qtype])
    params.nthread = len(os.sched_getaffinity(0))
    tmp = dst.with_suffix(".part")
    if llama_cpp.llama_model_quantize(str(src).encode(), str(tmp).encode(), ctypes.byref(params)) != 0:
        raise SystemExit(f"llama.cpp could not quantize {src} to {qtype}")
    tmp.rename(dst)
    return dst


def decode_bytes(path: Path) -> tuple[int, int]:
    """(bytes one decode step reads from the weights, bytes of all tensors) of a GGUF: every tensor but
    the embedding table, or all of them when the output head is the embedding table (tied)."""
    import gguf

    tensors = {t.name: int(t.n_bytes) for t in gguf.GGUFReader(path).tensors}
    total = sum(tensors.values())
    tied = "output.weight" not in tensors
    return (total if tied else total - tensors["token_embd.weight"]), total



def tensor_types(path: Path) -> dict[str, int]:
    """How many tensors of each GGML type the file holds, most first: what "Q4_K_M" means in this file
    (llama.cpp keeps some tensors at other types, e.g. Q6_K for the output, Q8_0 where a row is not whole
    256-blocks)."""
    import gguf

    return dict(Counter(t.tensor_type.name for t in gguf.GGUFReader(path).tensors).most_common())
