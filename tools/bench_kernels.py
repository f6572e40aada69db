"""Matrix-vector GB/s: torch's F.linear against shardllama's C++ kernel, on LLaMA-7B-sized matrices.

    python tools/bench_kernels.py                       # f16, 1 and 2 threads, markdown table
    python tools/bench_kernels.py --dtype f16 bf16 --rows 1 4
    python tools/bench_kernels.py --sweep 0 4096 16384  # the kernel at several prefetch distances (bytes)
    python tools/bench_kernels.py --decode-layers 4     # + decode ms/token of a LLaMA-7B-shaped f16 model

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

from shardllama import kernels

SHAPES = [(4096, 4096), (11008, 4096), (4096, 11008)]  # (N, K): wq/wo, w1/w3, w2 of LLaMA-7B
DTYPES = {"f16": torch.float16, "bf16": torch.bfloat16}


def gbps(fns: dict, weights: list[torch.Tensor], x: torch.Tensor, repeats: int) -> dict[str, float]:
    """Median GB/s of each fn(x, w) over ``repeats`` passes through ``weights``, the fns taking turns (so
    that a busy moment of the machine hits them alike)."""
    nbytes = sum(w.numel() * w.element_size() for w in weights)
    rates: dict[str, list[float]] = {name: [] for name in fns}
    for name, fn in fns.items():
        for w in weights[:2]:
            fn(x, w)  # warm-up: thread pool, page faults
    for _ in range(repeats):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            for w in weights:
                fn(x, w)
            rates[name].append(nbytes / (time.perf_counter() - t0) / 1e9)
    return {name: statistics.median(r) for name, r in rates.items()}


def decode_bench(n_layers: int, tokens: int, threads: int) -> dict:
    """Median decode ms/token of a LLaMA-7B-shaped f16 model with ``n_layers`` layers, kernel on and off."""
    from shardllama.config import ModelArgs
    from shardllama.model import Transformer, expected_shapes, random_weight

    args = ModelArgs(dim=4096, n_layers=n_layers, n_heads=32, n_kv_heads=32, vocab_size=32000, hidden_dim=11008)
    weights = {name: random_weight(args, name, torch.float16) for name in expected_shapes(args)}  # one at a time
    read = sum(w.numel() * w.element_size() for n, w in weights.items() if n != "tok_embeddings.weight")
    torch.set_num_threads(threads)
    ref = Transformer(args, weights, max_seq_len=64 + tokens)
    prompt = torch.randint(0, args.vocab_size, (1, 16), generator=torch.Generator().manual_seed(0))
    caches, times, seqs = {}, {True: [], False: []}, {True: [], False: []}
    for on in (True, False):
        kernels.enable(on)
        caches[on] = ref.new_cache()
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
    return {"layers": n_layers, "threads": threads, "tokens": tokens, "weight_bytes_per_token": read,
            "kernel_ms": ms[True], "torch_ms": ms[False], "same_tokens": seqs[True] == seqs[False],
            "kernel_gbps": read / ms[True] / 1e6, "torch_gbps": read / ms[False] / 1e6}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    p.add_argument("--dtype", nargs="+", choices=list(DTYPES), default=["f16"])
    p.add_argument("--rows", type=int, nargs="+", default=[1], help="rows of x (1: one sequence decoding)")
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--working-set", type=float, default=1.0, help="GiB of weight copies cycled through (default 1)")
    p.add_argument("--sweep", type=int, nargs="+", metavar="BYTES", help="time the kernel at these prefetch distances")
    p.add_argument("--isa", choices=("auto", "avx2", "avx512"), default="auto", help="force the kernel's instruction set")
    p.add_argument("--decode-layers", type=int, metavar="N", help="also time decoding of a 7B-shaped model with N layers")
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
    results = []
    for dname in [] if a.skip_matrices else a.dtype:
        for N, K in SHAPES:
            w0 = torch.randn(N, K).to(DTYPES[dname])
            copies = max(2, int(a.working_set * 2**30 // (w0.numel() * w0.element_size())))
            weights = [w0] + [w0.clone() for _ in range(copies - 1)]
            for M in a.rows:
                x = torch.randn(M, K).to(w0.dtype)
                for threads in a.threads:
                    torch.set_num_threads(threads)
                    fns = {"torch": F.linear}
                    for d in distances:
                        fns[f"kernel_pf{d}"] = lambda x, w, d=d: lib.matvec(x, w, d, isa)
                    row = {"dtype": dname, "N": N, "K": K, "rows": M, "threads": threads}
                    row.update(gbps(fns, weights, x, a.repeats))
                    results.append(row)
                    print(row, file=sys.stderr, flush=True)
            del weights, w0

    if results:
        heads = ["torch F.linear"] + [f"kernel (prefetch {d})" if a.sweep else "kernel" for d in distances]
        print(f"| matrix (N×K) | dtype | rows of x | threads | {' | '.join(h + ' GB/s' for h in heads)} | speed-up |")
        print("|---" * (5 + len(heads)) + "|")
        for r in results:
            ks = [r[f"kernel_pf{d}"] for d in distances]
            print(f"| {r['N']}×{r['K']} | {r['dtype']} | {r['rows']} | {r['threads']} | {r['torch']:.1f} | "
                  + " | ".join(f"{k:.1f}" for k in ks) + f" | {max(ks) / r['torch']:.2f}× |")
    decode = []
    if a.decode_layers:
        decode = [decode_bench(a.decode_layers, a.decode_tokens, t) for t in a.threads]
        print(f"\nLLaMA-7B shape, {a.decode_layers} layers + output head, f16, model.Transformer, "
              f"median of {a.decode_tokens} decode steps\n")
        print("| threads | torch ms/token | kernel ms/token | torch GB/s | kernel GB/s | speed-up | same tokens |")
        print("|---|---|---|---|---|---|---|")
        for d in decode:
            print(f"| {d['threads']} | {d['torch_ms']:.1f} | {d['kernel_ms']:.1f} | {d['torch_gbps']:.1f} | "
                  f"{d['kernel_gbps']:.1f} | {d['torch_ms'] / d['kernel_ms']:.2f}× | {d['same_tokens']} |")
    if a.json:
        a.json.write_text(json.dumps({"torch": torch.__version__, "results": results, "decode": decode}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
