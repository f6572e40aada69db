"""Matrix-vector GB/s: torch's F.linear against shardllama's C++ kernel, on LLaMA-7B-sized matrices.

    python tools/bench_kernels.py                       # f16, 1 and 2 threads, markdown table
    python tools/bench_kernels.py --dtype f16 bf16 int8 --rows 1 4
    python tools/bench_kernels.py --dtype int8 --rows 16 64   # prompts: kernel vs dequantize + matmul
    python tools/bench_kernels.py --sweep 0 4096 16384  # the kernel at several prefetch distances (bytes)
    python tools/bench_kernels.py --variants 1x4096 2x4096 4x0   # f16/bf16 variants: rows per step x prefetch
    python tools/bench_kernels.py --decode-layers 4     # + decode ms/token of a LLaMA-7B-shaped f16 model
    python tools/bench_kernels.py --decode-layers 4 --decode-dtype f16 int8 --skip-matrices

For int8 (shardllama.quant: int8 rows, an f32 scale per row, f32 x) the "torch" column is
``torch._weight_int8pack_mm``, torch's own int8 matrix product; from 9 rows of x on (a prompt) the
dequantize-and-matmul fallback (``quant.reference_linear``) and the same with bf16 are timed too, and
"torch bf16" is ``_weight_int8pack_mm`` with bf16 activations.  GB/s counts the bytes of q and scales.

GB/s counts the weight bytes read per call (what bounds decoding).  Each timing cycles through enough
copies of the matrix to exceed the caches (``--working-set``), so every call streams from DRAM as a decode
step does; the figure is the median over ``--repeats`` passes.

``--decode-layers N`` also times decoding through ``shardllama.model.Transformer`` (the reference model, one
process, 1 thread) on a LLaMA-7B-shaped f16 model cut to N layers, with the kernel and without
(``kernels.enable``), the two taking turns token by token; GB/s there is the weight bytes a token reads.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from shardllama import kernels, quant

SHAPES = [(4096, 4096), (11008, 4096), (4096, 11008)]  # (N, K): wq/wo, w1/w3, w2 of LLaMA-7B
DTYPES = {"f16": torch.float16, "bf16": torch.bfloat16, "int8": torch.int8}


def nbytes(w: torch.Tensor | quant.Int8Weight) -> int:
    return sum(t.numel() * t.element_size() for t in (w if isinstance(w, quant.Int8Weight) else (w,)))


def gbps(fns: dict, weights: list, x: torch.Tensor, repeats: int) -> dict[str, float]:
    """Median GB/s of each fn(x, w) over ``repeats`` passes through ``weights``, the fns taking turns (so
    that a busy moment of the machine hits them alike)."""
    total = sum(nbytes(w) for w in weights)
    rates: dict[str, list[float]] = {name: [] for name in fns}
    for name, fn in fns.items():
        for w in weights[:2]:
            fn(x, w)  # warm-up: thread pool, page faults
    for _ in range(repeats):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            for w in weights:
                fn(x, w)
            rates[name].append(total / (time.perf_counter() - t0) / 1e9)
    return {name: statistics.median(r) for name, r in rates.items()}


def decode_bench(n_layers: int, tokens: int, threads: int, dtype: str = "f16") -> dict:
    """Median decode ms/token of a LLaMA-7B-shaped model in ``dtype`` with ``n_layers`` layers, kernel on and
    off (off: torch's F.linear, or for int8 the dequantize-and-matmul fallback)."""
    from shardllama.config import ModelArgs
    from shardllama.model import Transformer, expected_shapes, random_weight
    from shardllama.kv_cache import blocks_for

    args = ModelArgs(dim=4096, n_layers=n_layers, n_heads=32, n_kv_heads=32, vocab_size=32000, hidden_dim=11008)
    weights = {}
    for name in expected_shapes(args):  # one at a time
        weights.update(quant.stored(name, random_weight(args, name), DTYPES[dtype]))
    read = sum(w.numel() * w.element_size() for n, w in weights.items() if n != "tok_embeddings.weight")
    torch.set_num_threads(threads)
    ref = Transformer(args, weights, max_seq_len=64 + tokens)
    prompt = torch.randint(0, args.vocab_size, (1, 16), generator=torch.Generator().manual_seed(0))
    caches, times, seqs = {}, {True: [], False: []}, {True: [], False: []}
    for on in (True, False):
        kernels.enable(on)
        caches[on] = ref.new_cache(blocks_for(ref.max_seq_len))
        seqs[on].append(int(ref.forward(prompt, caches[on]).argmax()))
    for i in range(tokens):
        for on in (True, False):  # alternate, so that a busy moment of the machine hits both alike
            kernels.enable(on)
            t0 = time.perf_counter()
            logits = ref.forward(torch.tensor([[seqs[on][-1]]]), caches[on], start=prompt.shape[1] + i)
            times[on].append(time.perf_counter() - t0)
            seqs[on].append(int(logits.argmax()))
    kernels.enable(None)
    ms = {on: 1000 * statistics.median(times[on][1:]) for on in (True, False)}
    return {"dtype": dtype, "layers": n_layers, "threads": threads, "tokens": tokens, "weight_bytes_per_token": read,
            "kernel_ms": ms[True], "torch_ms": ms[False], "same_tokens": seqs[True] == seqs[False],
            "kernel_gbps": read / ms[True] / 1e6, "torch_gbps": read / ms[False] / 1e6}


def contenders(dname: str, rows: int, lib, distances: list[int], isa: int, variants: list[str]) -> dict:
    """What computes ``x @ w.T`` for this dtype and number of rows: torch's way, then the kernel (at each prefetch
    distance, or for f16/bf16 each named variant, ROWSxPREFETCH)."""
    if dname != "int8":
        fns = {"torch": F.linear}
        for v in variants:
            r, d = map(int, v.split("x"))
            fns[f"kernel {v}"] = lambda x, w, r=r, d=d: lib.matvec(x, w, d, isa, r)
        for d in [] if variants else distances:
            fns[f"kernel_pf{d}"] = lambda x, w, d=d: lib.matvec(x, w, d, isa)
        return fns
    fns = {"torch": lambda x, w: torch._weight_int8pack_mm(x, w.q, w.scale),
           "torch bf16": lambda x, w: torch._weight_int8pack_mm(x.bfloat16(), w.q, w.scale.bfloat16())}
    if rows > lib.max_rows:  # a prompt: the kernel's blocks of rows against dequantizing per call
        fns["dequant f32"] = quant.reference_linear
        fns["dequant bf16"] = lambda x, w: F.linear(x.bfloat16(), quant.dequantize(w, torch.bfloat16))
    for d in distances:
        fns[f"kernel_pf{d}"] = lambda x, w, d=d: lib.matvec_int8(x, w.q, w.scale, d, isa)
    return fns


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    p.add_argument("--dtype", nargs="+", choices=list(DTYPES), default=["f16"])
    p.add_argument("--rows", type=int, nargs="+", default=[1], help="rows of x (1: one sequence decoding)")
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--working-set", type=float, default=1.0, help="GiB of weight copies cycled through (default 1)")
    p.add_argument("--sweep", type=int, nargs="+", metavar="BYTES", help="time the kernel at these prefetch distances")
    p.add_argument("--variants", nargs="+", metavar="RxP", default=[],
                   help="f16/bf16: time these kernel variants (weight rows per step x prefetch bytes, e.g. 4x0)")
    p.add_argument("--isa", choices=("auto", "avx2", "avx512"), default="auto", help="force the kernel's instruction set")
    p.add_argument("--decode-layers", type=int, metavar="N", help="also time decoding of a 7B-shaped model with N layers")
    p.add_argument("--decode-dtype", nargs="+", choices=list(DTYPES), default=["f16"], help="dtypes of that model")
    p.add_argument("--decode-tokens", type=int, default=16)
    p.add_argument("--skip-matrices", action="store_true", help="only the decode timing")
    p.add_argument("--json", type=Path, help="also write the figures here")
    a = p.parse_args(argv)

    lib = kernels.library()
    if lib is None:
        print("the kernel is unavailable here (see the warning above); nothing to compare", file=sys.stderr)
        return 1
    isa = {"auto": -1, "avx2": 1, "avx512": 2}[a.isa]
    distances = a.sweep or [lib.default_prefetch]
    print(f"kernel variant in use (calibrated or SHARDLLAMA_MATVEC_VARIANT): {'x'.join(map(str, lib.variant()))}"
          f" (rows of {lib.short_k} weights or more), {'x'.join(map(str, lib.variant(True)))} (shorter rows)",
          file=sys.stderr)
    results = []
    for dname in [] if a.skip_matrices else a.dtype:
        for N, K in SHAPES:
            w0 = torch.randn(N, K) * 0.02
            w0 = quant.quantize(w0) if dname == "int8" else w0.to(DTYPES[dname])
            copies = max(2, int(a.working_set * 2**30 // nbytes(w0)))
            weights = [w0] + [type(w0)(*(t.clone() for t in w0)) if dname == "int8" else w0.clone()
                              for _ in range(copies - 1)]
            for M in a.rows:
                x = torch.randn(M, K).to(torch.float32 if dname == "int8" else w0.dtype)
                for threads in a.threads:
                    torch.set_num_threads(threads)
                    row = {"dtype": dname, "N": N, "K": K, "rows": M, "threads": threads}
                    # A prompt is compute-bound: two copies are enough, and dequantizing per call is slow.
                    row.update(gbps(contenders(dname, M, lib, distances, isa, a.variants), weights if M <= lib.max_rows
                                    else weights[:2], x, a.repeats))
                    results.append(row)
                    print(row, file=sys.stderr, flush=True)
            del weights, w0

    if results:
        others = [k for k in ("torch bf16", "dequant f32", "dequant bf16") if any(k in r for r in results)]
        keys = [f"kernel {v}" for v in a.variants] or [f"kernel_pf{d}" for d in distances]
        heads = ["torch"] + others + ([f"kernel {v}" for v in a.variants] if a.variants else
                                      [f"kernel (prefetch {d})" if a.sweep else "kernel" for d in distances])
        print("\ntorch: F.linear, or for int8 torch._weight_int8pack_mm with f32 x (torch bf16: with bf16 x); "
              "dequant: quant.reference_linear (f32) and the same in bf16; GB/s of weight bytes (int8: q + scales)\n")
        print(f"| matrix (N×K) | dtype | rows of x | threads | {' | '.join(h + ' GB/s' for h in heads)} | speed-up |")
        print("|---" * (5 + len(heads)) + "|")
        for r in results:
            ks = [r[k] for k in keys if k in r] or [r[f"kernel_pf{d}"] for d in distances]
            cells = [f"{r[k]:.1f}" if k in r else "—" for k in ["torch"] + others] + [f"{k:.1f}" for k in ks]
            best_other = max(r[k] for k in ["torch"] + others if k in r)
            print(f"| {r['N']}×{r['K']} | {r['dtype']} | {r['rows']} | {r['threads']} | " + " | ".join(cells)
                  + f" | {max(ks) / best_other:.2f}× |")
    decode = []
    if a.decode_layers:
        decode = [decode_bench(a.decode_layers, a.decode_tokens, t, d) for d in a.decode_dtype for t in a.threads]
        print(f"\nLLaMA-7B shape, {a.decode_layers} layers + output head, model.Transformer, "
              f"median of {a.decode_tokens} decode steps (torch: F.linear; for int8 dequantize + F.linear)\n")
        print("| dtype | threads | torch ms/token | kernel ms/token | torch GB/s | kernel GB/s | speed-up | same tokens |")
        print("|---|---|---|---|---|---|---|---|")
        for d in decode:
            print(f"| {d['dtype']} | {d['threads']} | {d['torch_ms']:.1f} | {d['kernel_ms']:.1f} | {d['torch_gbps']:.1f} | "
                  f"{d['kernel_gbps']:.1f} | {d['torch_ms'] / d['kernel_ms']:.2f}× | {d['same_tokens']} |")
    if a.json:
        a.json.write_text(json.dumps({"torch": torch.__version__, "results": results, "decode": decode}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
