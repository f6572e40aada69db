"""Quantized-block kernels (shardllama.kernels.blocks): ms per call and GB/s of block bytes, one thread.

    flock /tmp/bench.lock python tools/bench_qkernels.py                    # every type, M = 1, markdown
    flock /tmp/bench.lock python tools/bench_qkernels.py --types Q4_K Q6_K --rows 1 4 8 --variants 0 1
    flock /tmp/bench.lock python tools/bench_qkernels.py --rows 64            # prompts: dequantized tiles + GEMM

Matrices of LLaMA-7B shapes (N, K) = (11008, 4096) (w1/w3) and (4096, 11008) (w2), random blocks with
finite f16 scales (the kernels' speed does not depend on the values).  Each timing cycles through copies of
the matrix totalling ``--working-set`` MB, so the blocks come from memory as in decoding; the figure is the
best of ``--repeats`` passes.  GB/s counts block bytes read per call.
"""

from __future__ import annotations

import argparse
import time

import torch
from gguf import GGMLQuantizationType as Q

from shardllama.kernels import blocks as B
from shardllama.kernels.build import cpuinfo

SHAPES = [(11008, 4096), (4096, 11008)]
SCALES = {Q.Q6_K: (208,), Q.Q4_1: (0, 2), Q.Q5_1: (0, 2), Q.Q4_K: (0, 2), Q.Q5_K: (0, 2)}  # else (0,)


def random_blocks(qtype: Q, N: int, K: int) -> torch.Tensor:
    bs, ts = B.SUPPORTED[qtype]
    b = torch.randint(0, 256, (N, K // bs, ts), dtype=torch.uint8)
    for at in SCALES.get(qtype, (0,)):
        b[:, :, at:at + 2] = (torch.randn(N, K // bs, 1) * 0.01).half().view(torch.uint8)
    return b


def timed(fn, mats: list[torch.Tensor], repeats: int, clock=time.perf_counter) -> float:
    """Seconds per call, the best of ``repeats`` passes through ``mats`` (the least disturbed by other work)."""
    fn(mats[0])
    per_call = []
    for _ in range(repeats):
        t0 = clock()
        for m in mats:
            fn(m)
        per_call.append((clock() - t0) / len(mats))
    return min(per_call)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--types", nargs="+", default=[t.name for t in B.SUPPORTED])
    ap.add_argument("--rows", nargs="+", type=int, default=[1], help="rows of x (M)")
    ap.add_argument("--variants", nargs="+", type=int, default=[-1], help="-1: as linear chooses; 0 after, 1 before")
    ap.add_argument("--shapes", nargs="+", default=[f"{n}x{k}" for n, k in SHAPES],
                    help="NxK matrices (a small one, with --working-set 0, stays in cache: the compute rate)")
    ap.add_argument("--prefetch", nargs="+", type=int, default=[-1], help="bytes ahead (-1: the default)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--working-set", type=int, default=512, help="MB of copies cycled through")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--cpu-time", action="store_true", help="time by the thread's CPU time (a machine shared with "
                    "other work; one thread only), not the wall clock")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if args.cpu_time and args.threads != 1:
        raise SystemExit("--cpu-time measures one thread")
    lib = B.library()
    if lib is None:
        raise SystemExit("the quantized-block kernels are unavailable here")
    print(f"{cpuinfo('model name')}, {args.threads} thread(s), torch {torch.__version__}\n")
    print("| type | N x K | M | variant | prefetch | ms/call | GB/s | Gweights/s |")
    print("|---|---|---|---|---|---|---|---|")
    for name in args.types:
        qtype = Q[name]
        for N, K in (map(int, shape.split("x")) for shape in args.shapes):
            one = random_blocks(qtype, N, K)
            copies = max(1, args.working_set * 2**20 // one.numel())
            mats = [one] + [one.clone() for _ in range(copies - 1)]
            for M in args.rows:
                x = torch.randn(M, K)
                runs = [(v, pf) for v in args.variants for pf in args.prefetch] if M <= B.MAX_ROWS else [(-1, -1)]
                for v, pf in runs:
                    if M > B.MAX_ROWS:
                        fn = lambda m: B.linear(x, m, qtype)  # noqa: E731
                    else:
                        fn = lambda m: lib.matvec(x, m, int(qtype), v, pf)  # noqa: E731
                    s = timed(fn, mats, args.repeats, time.thread_time if args.cpu_time else time.perf_counter)
                    print(f"| {name} | {N}x{K} | {M} | {v} | {pf} | {s * 1e3:.2f} | {one.numel() / s / 1e9:.2f} | "
                          f"{N * K / s / 1e9:.2f} |", flush=True)
            del mats, one


if __name__ == "__main__":
    main()
