"""Projected decode speed and memory of LLaMA-30B / 65B, from a few real-sized layers measured here.

    python tools/project.py                          # 30b and 65b, f16, N = 1 and 2, 1 and 3 layers
    python tools/project.py --shape 65b --layers 2 4 --workers 2 --out-dir tools/results

A 30B or 65B f16 model (65 / 130 GB) does not fit this machine, but every layer of it is the same work.
So the tool builds the model with its real dimensions (random weights) twice, with L1 and L2 layers, times
decode (ms/token) and prefill (tok/s) on N workers, and splits the time into a per-layer part
``(t(L2) - t(L1)) / (L2 - L1)`` and a fixed part (embedding, output head, messaging):

    projected ms/token = fixed + n_layers x per-layer

Memory per worker is not measured but computed exactly from the sharding plan (the bytes each worker's
shard holds) plus its KV cache at --context tokens; the coordinator holds the token embedding.  The
projection assumes what the measurement cannot show: that a machine with enough RAM streams the full
model at the bandwidth the few layers got here (decode is memory-bound; a model that does not fit in
RAM would page, and nothing here projects that).
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import sys
import time
from pathlib import Path

import psutil
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from scaling import SHAPES, time_backend  # noqa: E402

from shardllama.config import ModelArgs  # noqa: E402
from shardllama.coordinator import Coordinator  # noqa: E402
from shardllama.model import DTYPES, random_weight  # noqa: E402
from shardllama.sharding import plan  # noqa: E402
from shardllama.shm import EMBED, _layouts  # noqa: E402

GB = 1e9


def memory_per_worker(args: ModelArgs, n: int, dtype: torch.dtype, context: int) -> dict:
    """Bytes of the largest worker's shard and KV cache, and of the coordinator's embedding, for N workers."""
    specs = plan(args, n)
    layouts = _layouts(args, specs, dtype)
    size = lambda layout: sum(math.prod(shape) * dt.itemsize for dt, shape in layout.values())  # noqa: E731
    shards = [size(layouts[f"r{s.rank}"]) for s in specs]
    kv = [2 * args.n_layers * context * len(s.kv_heads) * args.head_dim * dtype.itemsize for s in specs]
    return dict(workers=n, shard_gb=max(shards) / GB, kv_gb=max(kv) / GB, worker_gb=max(map(sum, zip(shards, kv))) / GB,
                coordinator_gb=size(layouts[EMBED]) / GB)


def measure(shape: str, layers: int, n: int, dtype: torch.dtype, a: argparse.Namespace) -> dict:
    args = ModelArgs(**{**SHAPES[shape], "n_layers": layers}, max_seq_len=a.max_seq_len)
    t0 = time.perf_counter()
    with Coordinator(args, lambda name: random_weight(args, name, dtype), n_workers=n, dtype=dtype,
                     max_seq_len=a.max_seq_len) as c:
        build_s = time.perf_counter() - t0
        prefill, decode = time_backend(c, args.vocab_size, a.prompt_len, a.decode_tokens, a.repeat)
    print(f"{shape} {layers} layers N={n}: decode {decode:.1f} ms/token, prefill {prefill:.1f} tok/s "
          f"(built in {build_s:.0f} s)", file=sys.stderr)
    return dict(layers=layers, decode_ms=decode, prefill_tok_s=prefill)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shape", nargs="+", choices=SHAPES, default=["30b", "65b"])
    p.add_argument("--layers", type=int, nargs=2, default=[1, 3], metavar=("L1", "L2"))
    p.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    p.add_argument("--dtype", default="f16", choices=DTYPES)
    p.add_argument("--prompt-len", type=int, default=32)
    p.add_argument("--decode-tokens", type=int, default=8)
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--max-seq-len", type=int, default=128)
    p.add_argument("--context", type=int, default=2048, help="KV cache positions for the memory projection")
    p.add_argument("--memory-workers", type=int, nargs="+", default=[1, 2, 4, 8, 16])
    p.add_argument("--out-dir", type=Path, default=Path("tools/results"))
    a = p.parse_args()
    l1, l2 = a.layers
    if not 1 <= l1 < l2:
        p.error("--layers L1 L2 needs 1 <= L1 < L2")
    dtype = DTYPES[a.dtype]

    results = []
    for shape in a.shape:
        full = ModelArgs(**SHAPES[shape])
        for n in a.workers:
            m1, m2 = (measure(shape, layers, n, dtype, a) for layers in (l1, l2))
            per_layer = (m2["decode_ms"] - m1["decode_ms"]) / (l2 - l1)
            fixed = m1["decode_ms"] - l1 * per_layer
            # Prefill: seconds per token split the same way.
            s1, s2 = 1 / m1["prefill_tok_s"], 1 / m2["prefill_tok_s"]
            s_layer = (s2 - s1) / (l2 - l1)
            s_fixed = s1 - l1 * s_layer
            weights_per_layer = sum(math.prod(s) for s in _layer_shapes(full)) * dtype.itemsize
            results.append(dict(
                shape=shape, workers=n, measured=[m1, m2], decode_ms_per_layer=per_layer, decode_ms_fixed=fixed,
                projected_decode_ms=fixed + full.n_layers * per_layer,
                projected_prefill_tok_s=1 / (s_fixed + full.n_layers * s_layer),
                layer_gb_s=weights_per_layer / (per_layer / 1e3) / GB,
                memory=[memory_per_worker(full, k, dtype, a.context) for k in a.memory_workers if k <= full.n_heads],
            ))

    cpu = _cpu_name()
    print(f"\nProjection from {l1} and {l2} real-sized layers, {a.dtype}, {cpu}, {psutil.cpu_count(logical=False)} "
          f"cores, torch {torch.__version__}, {time.strftime('%Y-%m-%d')}\n")
    print("| model | workers | measured ms/layer | layer GB/s | fixed ms | **projected decode ms/token** "
          "| projected prefill tok/s |")
    print("|---|---|---|---|---|---|---|")
    for r in results:
        print(f"| LLaMA-{r['shape'].upper()} | {r['workers']} | {r['decode_ms_per_layer']:.1f} | {r['layer_gb_s']:.1f} "
              f"| {r['decode_ms_fixed']:.1f} | **{r['projected_decode_ms'] / 1e3:.2f} s** | "
              f"{r['projected_prefill_tok_s']:.2f} |")
    print(f"\nMemory per worker ({a.dtype} shard + KV cache for {a.context} tokens; the coordinator also holds the "
          "token embedding):\n")
    print("| model | " + " | ".join(f"N={k}" for k in a.memory_workers) + " | coordinator |")
    print("|---|" + "---|" * (len(a.memory_workers) + 1))
    for shape in a.shape:
        mem = {m["workers"]: m for m in next(r for r in results if r["shape"] == shape)["memory"]}
        cells = [f"{mem[k]['worker_gb']:.1f} GB" if k in mem else "-" for k in a.memory_workers]
        print(f"| LLaMA-{shape.upper()} | " + " | ".join(cells) + f" | {next(iter(mem.values()))['coordinator_gb']:.2f} GB |")

    a.out_dir.mkdir(parents=True, exist_ok=True)
    out = a.out_dir / f"projection-{'-'.join(a.shape)}-{a.dtype}.json"
    out.write_text(json.dumps(dict(date=time.strftime("%Y-%m-%d"), cpu=cpu, torch=torch.__version__, dtype=a.dtype,
                                   layers=a.layers, context=a.context, prompt_len=a.prompt_len,
                                   decode_tokens=a.decode_tokens, repeat=a.repeat, results=results), indent=2))
    print(f"\nwrote {out}", file=sys.stderr)
    return 0


def _layer_shapes(args: ModelArgs) -> list[tuple[int, int]]:
    hd = args.head_dim
    return [(args.n_heads * hd, args.dim), (args.n_kv_heads * hd, args.dim), (args.n_kv_heads * hd, args.dim),
            (args.dim, args.n_heads * hd), (args.hidden_dim, args.dim), (args.dim, args.hidden_dim),
            (args.hidden_dim, args.dim)]


def _cpu_name() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


if __name__ == "__main__":
    sys.exit(main())
