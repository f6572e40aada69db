"""Per-core scaling of the tensor-parallel engine: decode ms/token and prefill tok/s for N = 1..cores.

    python tools/scaling.py                       # the demo model, f32, N = 1..physical cores
    python tools/scaling.py --model-path M --dtype f16 --workers 1 2 --out-dir bench/
    python tools/scaling.py --shape 7b --layers 4     # random weights, LLaMA-7B layer shapes, 4 layers

For every N it starts a coordinator with N workers, times prefill of a --prompt-len token prompt and
--decode-tokens single-token steps (median of --repeat runs), reads the PSS of every process (the
coordinator and each worker; shared-memory pages are split between the processes that map them, so the
sum is the real footprint), and measures the synchronisation cost (the same number of layers at a tiny
width, where the time is nearly all messaging, divided by the layer count) and the machine's memory
bandwidth with N single-thread processes, the ceiling for memory-bound decoding.  Prints a markdown table and
writes scaling.json and scaling.png to --out-dir.  The plot needs matplotlib (``pip install 'shardllama[plots]'``);
without it, or with --no-plot, the table and scaling.json are all.  ``--from-json scaling.json`` prints the table
and draws the plot of an earlier run without measuring again.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import psutil
import torch

from shardllama.config import ModelArgs
from shardllama.coordinator import Coordinator, default_workers
from shardllama.loading import open_checkpoint
from shardllama.model import DTYPES, expected_shapes, random_weight, random_weights
from shardllama.kv_cache import blocks_for, contiguous_tables
from shardllama.quant import activation_dtype, source_dtype, stored


# Layer shapes of the LLaMA family (random weights; --layers keeps the first few, since the cost per layer
# is what scales with workers and a full 30B does not fit this machine).
SHAPES = {
    "7b": dict(dim=4096, n_layers=32, n_heads=32, n_kv_heads=32, hidden_dim=11008, vocab_size=32000),
    "13b": dict(dim=5120, n_layers=40, n_heads=40, n_kv_heads=40, hidden_dim=13824, vocab_size=32000),
    "30b": dict(dim=6656, n_layers=60, n_heads=52, n_kv_heads=52, hidden_dim=17920, vocab_size=32000),
    "65b": dict(dim=8192, n_layers=80, n_heads=64, n_kv_heads=64, hidden_dim=22016, vocab_size=32000),
}


def time_backend(backend, vocab: int, prompt_len: int, decode_tokens: int, repeat: int) -> tuple[float, float]:
    """Median prefill tok/s and decode ms/token over ``repeat`` runs of one sequence in blocks 0.."""
    g = torch.Generator().manual_seed(0)
    table = contiguous_tables(torch.tensor([0]), blocks_for(backend.max_seq_len))
    prompt = torch.randint(0, vocab, (1, prompt_len), generator=g)
    prefill, decode = [], []
    for _ in range(repeat):
        t = time.perf_counter()
        backend.forward(prompt, torch.tensor([0]), table)
        prefill.append(prompt_len / (time.perf_counter() - t))
        t = time.perf_counter()
        for i in range(decode_tokens):
            backend.forward(torch.tensor([[i % vocab]]), torch.tensor([prompt_len + i]), table)
        decode.append(1000 * (time.perf_counter() - t) / decode_tokens)
    return statistics.median(prefill), statistics.median(decode)


def pss_mb(pids: list[int]) -> list[float]:
    return [psutil.Process(pid).memory_full_info().pss / 2**20 for pid in pids]


_MATVEC = """
import sys, time, torch, torch.nn.functional as F
torch.set_num_threads(1)
W = [torch.randn(11008, 4096) for _ in range(4)]  # 720 MB: beyond any cache (Sapphire Rapids VMs: 260 MB L3)
x = torch.randn(1, 4096)
from shardllama import kernels
lib = kernels.library()
readers = [lambda w: F.linear(x, w), torch.sum]  # MKL's f32 matvec, a reduction, plain reads: the fastest counts
readers += [lambda w, s=s: lib.read_all(w, s) for s in (1, 2, 4, 8)] if lib is not None else []
best = 0.0
for read in readers:
    for w in W: read(w)
    t, n = time.perf_counter(), 0
    while time.perf_counter() - t < 1:
        for w in W: read(w)
        n += 1
    best = max(best, n * sum(w.numel() * 4 for w in W) / (time.perf_counter() - t) / 1e9)
print(best)
"""


def bandwidth_gb_s(n: int) -> float:
    """What n single-thread processes reading memory at once move together (GB/s; each the fastest of an f32
    matvec, a sum and plain reads in 1-8 streams over 720 MB): the ceiling of memory-bound decoding on n
    workers, measured now."""
    procs = [subprocess.Popen([sys.executable, "-c", _MATVEC], stdout=subprocess.PIPE, text=True) for _ in range(n)]
    return sum(float(p.communicate()[0]) for p in procs)


def sync_overhead_ms(args: ModelArgs, n: int, repeat: int) -> float:
    """Decode time per layer of a model with the same layer count and a tiny width: messaging cost."""
    tiny = ModelArgs(dim=n * 16, n_layers=args.n_layers, n_heads=n, n_kv_heads=n, vocab_size=64, hidden_dim=n * 16, max_seq_len=64)
    with Coordinator(tiny, random_weights(tiny), n_workers=n, max_seq_len=64) as c:
        _, ms = time_backend(c, tiny.vocab_size, 4, 32, repeat)
    return ms / tiny.n_layers


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model-path", type=Path, help="default: the demo model")
    p.add_argument("--shape", choices=SHAPES, help="random weights of this LLaMA shape instead of a checkpoint")
    p.add_argument("--layers", type=int, help="with --shape: keep only this many layers")
    p.add_argument("--dtype", default="f32", choices=DTYPES)
    p.add_argument("--workers", type=int, nargs="+", help="worker counts (default 1..physical cores)")
    p.add_argument("--prompt-len", type=int, default=64)
    p.add_argument("--decode-tokens", type=int, default=32)
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--max-seq-len", type=int, default=256)
    p.add_argument("--out-dir", type=Path, default=Path("."))
    p.add_argument("--no-plot", action="store_true", help="no scaling.png (matplotlib not needed)")
    p.add_argument("--from-json", type=Path, metavar="FILE",
                   help="table and plot of an earlier run's scaling.json, measuring nothing")
    a = p.parse_args()
    if a.from_json is not None:
        meta = json.loads(a.from_json.read_text())
        report(meta)
        if not a.no_plot:
            plot_or_say(meta, a.out_dir)
        return 0

    dtype = DTYPES[a.dtype]
    # Weights go to the coordinator one tensor at a time, as in the CLI: this process never holds the
    # whole model, so its PSS is the coordinator's real footprint.
    if a.shape:
        args = ModelArgs(**{**SHAPES[a.shape], **({"n_layers": a.layers} if a.layers else {})}, max_seq_len=a.max_seq_len)
        load = lambda name: random_weight(args, name, source_dtype(dtype))  # noqa: E731 -- int8: quantized by the store
        label = f"LLaMA-{a.shape} shape, {args.n_layers} layers"
    else:
        if a.model_path is None:
            from shardllama.demo import demo_model_path

            a.model_path = demo_model_path()
        ckpt = open_checkpoint(a.model_path)
        args, load = ckpt.args, lambda name: ckpt.load(name, source_dtype(dtype))
        label = a.model_path.name
    # as stored: int8 matrices, their f32 scales, f32 norms and embedding
    sizes = {name: sum(t.numel() * t.element_size() for t in stored(name, torch.empty(shape, device="meta"), dtype).values())
             for name, shape in expected_shapes(args).items()}
    weight_mb = sum(sizes.values()) / 2**20
    # What a decode step reads: every weight but the embedding table, of which it looks up one row (unless the
    # output head is tied to it).
    read_gb = sum(v for k, v in sizes.items() if k != "tok_embeddings.weight" or "output.weight" not in sizes) / 1e9
    counts = a.workers or list(range(1, default_workers() + 1))

    rows = []
    for n in counts:
        with Coordinator(args, load, n_workers=n, dtype=dtype, max_seq_len=a.max_seq_len) as c:
            prefill, decode = time_backend(c, args.vocab_size, a.prompt_len, a.decode_tokens, a.repeat)
            pss = pss_mb([os.getpid(), *c.pids])
        kv_mb = 2 * args.n_layers * a.max_seq_len * args.kv_dim * activation_dtype(dtype).itemsize / 2**20
        rows.append(dict(workers=n, decode_ms=decode, decode_gb_s=read_gb / (decode / 1000), prefill_tok_s=prefill,
                         pss_total_mb=sum(pss),
                         pss_coordinator_mb=pss[0], pss_workers_mb=pss[1:], weights_mb=weight_mb, kv_cache_mb=kv_mb,
                         sync_ms_per_layer=sync_overhead_ms(args, n, a.repeat), bandwidth_gb_s=bandwidth_gb_s(n)))
        print(f"N={n}: decode {decode:.1f} ms/token, prefill {prefill:.0f} tok/s", file=sys.stderr)

    header = (f"{label}: {args.n_layers} layers, dim {args.dim}, {a.dtype}, {platform.processor() or platform.machine()}, "
              f"{psutil.cpu_count(logical=False)} cores, torch {torch.__version__}")
    meta = dict(model=label, header=header, dtype=a.dtype, prompt_len=a.prompt_len, decode_tokens=a.decode_tokens,
                repeat=a.repeat, torch=torch.__version__, date=time.strftime("%Y-%m-%d"), rows=rows)
    report(meta)
    a.out_dir.mkdir(parents=True, exist_ok=True)
    (a.out_dir / "scaling.json").write_text(json.dumps(meta, indent=2))
    if not a.no_plot:
        plot_or_say(meta, a.out_dir)
    return 0


def report(meta: dict) -> None:
    """The markdown table of a run (``meta``: what scaling.json holds)."""
    rows = meta["rows"]
    base = rows[0]["decode_ms"]
    print(f"\n{meta.get('header', meta['model'])}\n")
    print("| workers | decode ms/token | speed-up | bandwidth ceiling | decode GB/s (of ceiling) | prefill tok/s "
          "| prefill speed-up | PSS total MB | PSS / (weights + KV) | sync ms/layer |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        ratio = r["pss_total_mb"] / (r["weights_mb"] + r["kv_cache_mb"])
        ceiling = r["bandwidth_gb_s"] / rows[0]["bandwidth_gb_s"]
        print(f"| {r['workers']} | {r['decode_ms']:.1f} | {base / r['decode_ms']:.2f}× | {ceiling:.2f}× "
              f"({r['bandwidth_gb_s']:.1f} GB/s) | {r['decode_gb_s']:.1f} ({r['decode_gb_s'] / r['bandwidth_gb_s']:.0%}) "
              f"| {r['prefill_tok_s']:.0f} | "
              f"{r['prefill_tok_s'] / rows[0]['prefill_tok_s']:.2f}× | {r['pss_total_mb']:.0f} | {ratio:.2f} | "
              f"{r['sync_ms_per_layer']:.3f} |")


def plot_or_say(meta: dict, out_dir: Path) -> None:
    """scaling.png in ``out_dir``, or one line saying why not (matplotlib is an extra, not a dependency)."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        print("scaling.py: no plot: matplotlib is not installed (pip install 'shardllama[plots]'; or --no-plot)",
              file=sys.stderr)
        return
    out_dir.mkdir(parents=True, exist_ok=True)
    plot(meta["rows"], out_dir / "scaling.png", f"{meta['model']} ({meta['dtype']})")


def plot(rows: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = [r["workers"] for r in rows]
    fig, (left, right) = plt.subplots(1, 2, figsize=(9, 3.6))
    left.plot(n, [rows[0]["decode_ms"] / r["decode_ms"] for r in rows], "o-", label="decode")
    left.plot(n, [r["prefill_tok_s"] / rows[0]["prefill_tok_s"] for r in rows], "s-", label="prefill")
    left.plot(n, [r["bandwidth_gb_s"] / rows[0]["bandwidth_gb_s"] for r in rows], "^--", color="grey",
              label="memory-bandwidth ceiling")
    left.plot(n, n, ":", color="grey", label="linear")
    left.set(xlabel="workers", ylabel="speed-up over 1 worker", title=title, xticks=n)
    left.legend()
    right.bar(n, [r["decode_gb_s"] for r in rows], label="decode: weights read per second")
    right.plot(n, [r["bandwidth_gb_s"] for r in rows], "^--", color="grey", label="measured read bandwidth")
    right.set(xlabel="workers", ylabel="GB/s", xticks=n)
    right.legend(loc="upper left")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    sys.exit(main())
