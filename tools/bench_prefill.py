"""Prefill at f32 and at bf16 (shardllama.kernels.gemm): GEMM GFLOP/s on LLaMA-7B shard shapes, then the engine's
prefill tok/s, the precisions taking turns.

    python tools/bench_prefill.py                            # GEMMs at 128 rows, 1 thread; demo f16/f32, 2 workers
    python tools/bench_prefill.py --skip-engine --rows 64 128 512
    python tools/bench_prefill.py --skip-gemm --model-path M.gguf --dtypes f16 --workers 1 2 --rounds 2

GEMMs: an f16 weight of each ``--shapes`` (N, K) (default: the shards of wq, w1/w3 and w2 of LLaMA-7B over 2
workers) times ``--rows`` rows of f16 activations, as a worker of an f16 model computes them:
``gemm.linear`` at f32 (the weight widened into the scratch buffer, oneDNN's f32 GEMM) and at bf16 (weight and
activations rounded to bf16, oneDNN's bf16 GEMM); then the bare oneDNN products on weights already in f32 or
bf16 (no conversion), and torch's own bf16 ``F.linear`` and ``matmul``, to see where the time goes.
GFLOP/s = 2 N K rows / time, median of ``--repeats`` turns.

Engine: the model (default: the demo) in each ``--dtypes`` with ``--workers`` workers (one thread each), opened
once per precision per round (``--rounds``, taking turns), ``--repeat`` prefills of a ``--prompt-len``-token
prompt of seeded random ids each after a warm-up; tok/s is the median of all.  The machine may be shared:
run it alone (other sessions' work shows up as noise, reported as the min-max range).

Writes ``<out>.json`` and ``<out>.md`` (default tools/results/bench-prefill) and prints the table.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # time the engine beside this file (its workers import it from there too)

from shardllama.kernels import build, gemm  # noqa: E402

SHAPES = [(2048, 4096), (5504, 4096), (4096, 5504)]  # 2-worker shards of wq, w1/w3, w2 of LLaMA-7B


def timed(fns: dict, repeats: int) -> dict[str, list[float]]:
    """Seconds per call of each fn, ``repeats`` times, the fns taking turns (a busy moment hits them alike)."""
    for fn in fns.values():
        fn()
        fn()  # warm-up: scratch buffers, oneDNN's primitive cache
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    return times


def gemm_bench(shapes: list[tuple[int, int]], rows: list[int], threads: int, repeats: int) -> list[dict]:
    torch.set_num_threads(threads)
    out = []
    for n, k in shapes:
        g = torch.Generator().manual_seed(0)
        w = (torch.randn(n, k, generator=g) * 0.02).half()
        w32, w16b = w.float(), w.bfloat16()
        for m in rows:
            x = torch.randn(m, k, generator=g).half()
            x32, xb = x.float(), x.bfloat16()

            def at(precision: str):
                def run():
                    with gemm.using(precision):
                        gemm.linear(x, w)
                return run

            fns = {"gemm.linear f32 (f16 weight widened)": at("f32")}
            if gemm.bf16_supported():
                fns["gemm.linear bf16 (f16 weight narrowed)"] = at("bf16")
            fns.update({
                "oneDNN f32, f32 weight": lambda: gemm._onednn(x32, w32),
                "oneDNN bf16, bf16 weight": lambda: gemm._onednn(xb, w16b),
                "F.linear bf16": lambda: F.linear(xb, w16b),
                "matmul bf16": lambda: torch.matmul(xb, w16b.t()),
            })
            for name, ts in timed(fns, repeats).items():
                s = statistics.median(ts)
                out.append(dict(n=n, k=k, rows=m, threads=threads, op=name, ms=1000 * s, gflops=2 * n * k * m / s / 1e9,
                                ms_min=1000 * min(ts), ms_max=1000 * max(ts)))
            print(f"({n}, {k}) x {m} rows done", file=sys.stderr, flush=True)
    gemm.release()
    return out


def engine_bench(model_path, dtype: str, workers: int, prompt_len: int, rounds: int, repeat: int) -> list[dict]:
    from shardllama.kv_cache import blocks_for, contiguous_tables
    from shardllama.runtime import open_model

    torch.set_num_threads(1)  # the coordinator's own work stays on one thread
    precisions = ["f32"] + (["bf16"] if gemm.bf16_supported() else [])
    samples: dict[str, list[float]] = {p: [] for p in precisions}
    for r in range(rounds):
        for p in precisions:
            with open_model(model_path, dtype=dtype, workers=workers, max_seq_len=prompt_len + 8,
                            prefill_precision=p) as model:
                assert model.backend.prefill_precision == p
                g = torch.Generator().manual_seed(1)
                tokens = torch.randint(16, model.args.vocab_size, (1, prompt_len), generator=g)
                start, table = torch.tensor([0]), contiguous_tables(torch.tensor([0]), blocks_for(prompt_len + 8))
                model.backend.forward(tokens, start, table)  # warm-up: pages the weights in, builds kernels
                for _ in range(repeat):
                    t0 = time.perf_counter()
                    model.backend.forward(tokens, start, table)
                    samples[p].append(prompt_len / (time.perf_counter() - t0))
            print(f"{dtype} {workers} workers round {r + 1}/{rounds}, {p} prefill: "
                  f"{statistics.median(samples[p][-repeat:]):.1f} tok/s", file=sys.stderr, flush=True)
    return [dict(dtype=dtype, workers=workers, prompt_len=prompt_len, prefill_precision=p,
                 tok_s=statistics.median(v), tok_s_min=min(v), tok_s_max=max(v), samples=v)
            for p, v in samples.items()]


def markdown(result: dict) -> str:
    m = result["machine"]
    lines = [f"Prefill precision, {result['date']}: {m['cpu']} (model {m['cpu_model']}; {' '.join(m['flags'])}), "
             f"torch {result['torch']}; bf16 prefill {'available' if result['bf16_supported'] else 'unavailable'}.", ""]
    if result["gemm"]:
        lines += ["| (N, K) | rows | threads | op | ms (min–max) | GFLOP/s |", "|---|---|---|---|---|---|"]
        lines += [f"| ({r['n']}, {r['k']}) | {r['rows']} | {r['threads']} | {r['op']} | {r['ms']:.1f} "
                  f"({r['ms_min']:.1f}–{r['ms_max']:.1f}) | {r['gflops']:.1f} |" for r in result["gemm"]]
        lines.append("")
    if result["engine"]:
        lines += ["| model | weights | workers | prompt | prefill | tok/s (min–max) | vs f32 |", "|---|---|---|---|---|---|---|"]
        for r in result["engine"]:
            base = next(e for e in result["engine"] if e["dtype"] == r["dtype"] and e["workers"] == r["workers"]
                        and e["prefill_precision"] == "f32")
            lines.append(f"| {result['model']} | {r['dtype']} | {r['workers']} | {r['prompt_len']} | "
                         f"{r['prefill_precision']} | {r['tok_s']:.1f} ({r['tok_s_min']:.1f}–{r['tok_s_max']:.1f}) | "
                         f"{r['tok_s'] / base['tok_s']:.2f}× |")
    return "\n".join(lines) + "\n"


def machine() -> dict:
    info = {}
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("model name", "model") and key.strip() not in info:
            info[key.strip()] = value.strip()
    return dict(cpu=info.get("model name", platform.processor()), cpu_model=info.get("model"),
                flags=build.cpu_flags(("avx512f", "avx512_bf16", "avx512_fp16", "amx_bf16")),
                cpus=len(os.sched_getaffinity(0)))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shapes", type=lambda s: tuple(map(int, s.split("x"))), nargs="+", default=SHAPES, metavar="NxK")
    p.add_argument("--rows", type=int, nargs="+", default=[128])
    p.add_argument("--threads", type=int, default=1, help="torch threads for the GEMMs (a worker has one)")
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--model-path", type=Path, help="default: the demo model")
    p.add_argument("--dtypes", nargs="+", default=["f16", "f32"])
    p.add_argument("--workers", type=int, nargs="+", default=[2])
    p.add_argument("--prompt-len", type=int, default=128)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--skip-gemm", action="store_true")
    p.add_argument("--skip-engine", action="store_true")
    p.add_argument("--out", type=Path, default=ROOT / "tools" / "results" / "bench-prefill")
    a = p.parse_args(argv)

    result = dict(date=time.strftime("%Y-%m-%d"), machine=machine(), torch=torch.__version__,
                  bf16_supported=gemm.bf16_supported(), gemm=[], engine=[], model=None)
    if not a.skip_gemm:
        result["gemm"] = gemm_bench(a.shapes, a.rows, a.threads, a.repeats)
    if not a.skip_engine:
        if a.model_path is None:
            from shardllama.demo import demo_model_path

            a.model_path = demo_model_path()
        result["model"] = a.model_path.name
        for dtype in a.dtypes:
            for n in a.workers:
                result["engine"] += engine_bench(a.model_path, dtype, n, a.prompt_len, a.rounds, a.repeat)
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.with_suffix(".json").write_text(json.dumps(result, indent=1) + "\n")
    table = markdown(result)
    a.out.with_suffix(".md").write_text(table)
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
