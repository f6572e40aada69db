"""Where a decode step's time goes: one worker's layers, the synchronisation per pass, the whole token.

    python tools/decode_overhead.py                                  # demo model, f16, 2 workers
    python tools/decode_overhead.py --model-path M --dtype f32 int8 --workers 2 --json out.json

For each weight dtype and each setting of SHARDLLAMA_KERNELS (``--kernels``; by default ``all`` and
``matvec,blocks``, i.e. with and without the decode-step library, shardllama.kernels.decode), a fresh process
measures, at positions after a --prompt-len prompt:

- **layer**: rank 0's slice of the model for N workers, in this process, on one thread, decode steps with no
  reduction: microseconds per layer (matrix products and everything around them);
- **sync**: a model with the same number of layers and a tiny width on N workers: ms per decode pass, nearly all
  messaging, reductions and waiting (tools/scaling.py's measure, times the layers);
- **token**: the model itself on N workers: decode ms/token (median of --repeat runs of --decode-tokens).

Prints a markdown table (medians); ``--json FILE`` writes every figure.  Timings: run it on a quiet machine.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

DTYPES = ("f32", "f16", "bf16", "int8")


def one(a: argparse.Namespace) -> dict:
    """The three figures for one dtype in this process (SHARDLLAMA_KERNELS as the environment says)."""
    from scaling import sync_overhead_ms, time_backend

    from shardllama import sharding
    from shardllama.convert import cut
    from shardllama.coordinator import Coordinator
    from shardllama.kv_cache import blocks_for, contiguous_tables
    from shardllama.loading import open_checkpoint
    from shardllama.model import DTYPES as MODEL_DTYPES, Step
    from shardllama.quant import source_dtype
    from workers.shard import ShardModel

    torch.set_num_threads(1)
    dtype = MODEL_DTYPES[a.dtype[0]]
    ckpt = open_checkpoint(a.model_path)
    args, load = ckpt.args, lambda name: ckpt.load(name, source_dtype(dtype))
    spec = sharding.plan(args, a.workers, dtype)[0]
    weights = {name: part.clone() for _, name, part in cut(args, [spec], dtype, load)}
    seq = a.prompt_len + a.decode_tokens + 1
    block_size = 16
    model = ShardModel(args, spec, weights, dtype, seq, blocks_for(seq, block_size), block_size)
    table = contiguous_tables(torch.tensor([0]), blocks_for(seq, block_size))
    h = torch.randn(1, 1, args.dim).to(model.cache.k.dtype)
    passes = []
    for pos in range(a.prompt_len, a.prompt_len + a.decode_tokens):
        t = time.perf_counter()
        model.whole_pass(h, Step.make(torch.tensor([pos]), 1, table, model.rope, block_size), None, False, 0, None)
        passes.append(time.perf_counter() - t)
    del model, weights
    layer_us = 1e6 * statistics.median(passes[len(passes) // 4:]) / args.n_layers  # after a warm-up quarter
    sync_ms = sync_overhead_ms(args, a.workers, a.repeat) * args.n_layers
    with Coordinator(args, load, n_workers=a.workers, dtype=dtype, max_seq_len=seq) as c:
        _, token_ms = time_backend(c, args.vocab_size, a.prompt_len, a.decode_tokens, a.repeat)
    return dict(layer_us=layer_us, pass_us=layer_us * args.n_layers, sync_ms_per_pass=sync_ms, token_ms=token_ms,
                layers=args.n_layers)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model-path", type=Path, help="default: the demo model")
    p.add_argument("--dtype", nargs="+", default=["f16"], choices=DTYPES)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--kernels", nargs="+", default=["all", "matvec,blocks"],
                   help="SHARDLLAMA_KERNELS settings to compare (default: all, and without the decode-step library)")
    p.add_argument("--prompt-len", type=int, default=32)
    p.add_argument("--decode-tokens", type=int, default=32)
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--json", type=Path, metavar="FILE")
    p.add_argument("--one", action="store_true", help=argparse.SUPPRESS)  # a child: one dtype, JSON on stdout
    a = p.parse_args()
    if a.model_path is None:
        from shardllama.demo import demo_model_path

        a.model_path = demo_model_path()
    if a.one:
        print(json.dumps(one(a)))
        return 0
    rows = []
    for dtype in a.dtype:
        for kernels in a.kernels:
            cmd = [sys.executable, __file__, "--one", "--model-path", str(a.model_path), "--dtype", dtype,
                   "--workers", str(a.workers), "--prompt-len", str(a.prompt_len),
                   "--decode-tokens", str(a.decode_tokens), "--repeat", str(a.repeat)]
            out = subprocess.run(cmd, env={**os.environ, "SHARDLLAMA_KERNELS": kernels}, check=True,
                                 stdout=subprocess.PIPE, text=True).stdout
            rows.append(dict(dtype=dtype, kernels=kernels, **json.loads(out.strip().splitlines()[-1])))
            print(f"{dtype} SHARDLLAMA_KERNELS={kernels}: {rows[-1]['token_ms']:.1f} ms/token", file=sys.stderr)
    print(f"{a.model_path.name}, {a.workers} workers, decode after a {a.prompt_len}-token prompt, "
          f"{time.strftime('%Y-%m-%d')}\n")
    print("| weights | SHARDLLAMA_KERNELS | one worker: µs/layer | µs/pass | sync ms/pass | decode ms/token |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['dtype']} | {r['kernels']} | {r['layer_us']:.0f} | {r['pass_us']:.0f} | {r['sync_ms_per_pass']:.2f} "
              f"| {r['token_ms']:.1f} |")
    if a.json:
        a.json.write_text(json.dumps(dict(model=a.model_path.name, workers=a.workers, prompt_len=a.prompt_len,
                                          date=time.strftime("%Y-%m-%d"), rows=rows), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
