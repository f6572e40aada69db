"""Everything issue 15 asks a GPU machine to measure, in one run: prepared on a CPU, for minutes of GPU time.

    python3 tools/gpu_check.py --out gpu-results            # on the GPU machine: all of it (~8-10 min)
    python3 tools/gpu_check.py --device cpu --no-big --out /tmp/dry   # anywhere: the same path on CPU workers

What it does, writing ``results.md`` (and ``results.json``) into ``--out`` as it goes, so a run cut short
still leaves what it measured:

1. a small random model (GGUF, ``tools/make_gguf.py``) and, unless ``--no-big``, a random 7B-shaped f16 one
   (13.5 GB, written to ``--work``);
2. for each model: the GPU engine (one worker on ``cuda:0``) against the CPU reference (``--workers 0``, same
   f16 weights) on ``--tokens`` random token ids, teacher-forced: rms of the logits' difference (and the
   logits' own rms), and top-1 agreement (issue 15 asks >= 99%);
3. on 1 GPU: prefill tok/s (a ``--prefill``-token prompt) and decode ms/token (``--decode`` steps, greedy),
   beside the bandwidth floor (weight bytes / ``--bandwidth-gbs``; H200: 4800 GB/s);
4. with 2+ GPUs: the same on every GPU (NCCL reductions), and its agreement; else it says that none ran.

``--device cpu`` (the dry mode) runs the same steps with CPU workers: two of them summing through gloo
(``--reduce dist``), i.e. the code path NCCL takes.  It checks the script, not a GPU.

The GPU machine seen so far lacks pyzmq and gguf (no network there): bring wheels for its Python (3.12),
e.g. ``python3 -m pip download pyzmq gguf sentencepiece tokenizers tiktoken safetensors psutil tqdm jinja2
ninja --only-binary=:all: --python-version 3.12 --platform manylinux2014_x86_64 -d wheels`` here, then
``python3 -m pip install --no-index --find-links wheels pyzmq gguf ...`` there.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's shardllama

import torch  # noqa: E402

from shardllama.kv_cache import blocks_for  # noqa: E402
from shardllama.runtime import open_model  # noqa: E402

SMALL = dict(shape="tiny", dim=512, n_layers=4, n_heads=8, n_kv_heads=2, hidden_dim=1376, vocab_size=32000)


class Report:
    def __init__(self, out: Path):
        self.out = out
        out.mkdir(parents=True, exist_ok=True)
        self.lines: list[str] = []
        self.data: dict = {}

    def add(self, line: str, **data) -> None:
        print(line, flush=True)
        self.lines.append(line)
        self.data.update(data)
        (self.out / "results.md").write_text("\n".join(self.lines) + "\n")
        (self.out / "results.json").write_text(json.dumps(self.data, indent=1, default=str))


def make_model(work: Path, name: str, **shape) -> Path:
    from make_gguf import random_args, write_random  # tools/ is on the path when run as a script

    path = work / f"{name}.gguf"
    if not path.exists():
        t0 = time.monotonic()
        write_random(path, random_args(**shape), dtype="f16", seed=0)
        print(f"wrote {path} in {time.monotonic() - t0:.0f} s", flush=True)
    return path


def table(model) -> torch.Tensor:
    """One row's block table: blocks 0.. (the default cache holds one context)."""
    return torch.arange(blocks_for(model.backend.max_seq_len))[None]


def teacher_forced(model, tokens: torch.Tensor) -> torch.Tensor:
    """f32 logits of every position (T, vocab) of one row."""
    return model.backend.forward(tokens[None], torch.tensor([0]), table(model), all_logits=True)[0]


def compare(report: Report, label: str, got: torch.Tensor, want: torch.Tensor) -> None:
    rms = float((got - want).pow(2).mean().sqrt())
    scale = float(want.pow(2).mean().sqrt())
    agree = float((got.argmax(-1) == want.argmax(-1)).float().mean())
    report.add(f"- {label}: rms(logits diff) {rms:.3g} (logits rms {scale:.3g}); teacher-forced top-1 agreement "
               f"{100 * agree:.1f}% over {want.shape[0]} positions {'(ok)' if agree >= 0.99 else '(BELOW 99%)'}",
               **{f"{label} rms": rms, f"{label} agreement": agree})


def timing(report: Report, label: str, model, prefill: int, decode: int, weight_bytes: int, gbs: float) -> None:
    vocab = model.args.vocab_size
    g = torch.Generator().manual_seed(1)
    prompt = torch.randint(3, vocab, (1, prefill), generator=g)
    t = table(model)
    model.backend.forward(prompt[:, :8], torch.tensor([0]), t)  # warm-up (allocator, kernels, NCCL)
    t0 = time.perf_counter()
    logits = model.backend.forward(prompt, torch.tensor([0]), t)
    t_prefill = time.perf_counter() - t0
    token, pos = int(logits[0].argmax()), prefill
    t0 = time.perf_counter()
    for _ in range(decode):
        logits = model.backend.forward(torch.tensor([[token]]), torch.tensor([pos]), t)
        token, pos = int(logits[0].argmax()), pos + 1
    ms = (time.perf_counter() - t0) * 1000 / decode
    floor = weight_bytes / (gbs * 1e9) * 1000
    report.add(f"- {label}: prefill {prefill / t_prefill:,.0f} tok/s ({prefill} tokens); decode {ms:.2f} ms/token "
               f"over {decode} tokens (bandwidth floor {floor:.2f} ms/token: {weight_bytes / 1e9:.2f} GB of weights at "
               f"{gbs:.0f} GB/s; {100 * floor / ms:.0f}% of it)",
               **{f"{label} prefill tok/s": prefill / t_prefill, f"{label} decode ms/token": ms})


def check_model(report: Report, a, path: Path, name: str, devices: list[list[str]]) -> None:
    report.add(f"\n## {name} ({path.name})")
    kw = dict(dtype="f16", max_seq_len=max(a.tokens, a.prefill + a.decode + 8))
    tokens = torch.randint(3, 32000, (a.tokens,), generator=torch.Generator().manual_seed(0))
    t0 = time.monotonic()
    with open_model(path, workers=0, **kw) as ref:  # the CPU oracle: the reference model, in this process
        want = teacher_forced(ref, tokens)
    report.add(f"- CPU reference: {time.monotonic() - t0:.0f} s", **{f"{name} cpu ref s": time.monotonic() - t0})
    weight_bytes = path.stat().st_size  # f16 weights, nearly all of the file; each decode step reads them once
    for devs in devices:
        label = f"{name}, {len(devs)} x {devs[0].split(':')[0]}" + (" (gloo)" if devs[0] == "cpu" and len(devs) > 1 else "")
        reduce = "dist" if len(devs) > 1 else None
        t0 = time.monotonic()
        with open_model(path, workers=len(devs), devices=None if devs[0] == "cpu" else devs,
                        reduce=reduce, worker_timeout=300, **kw) as m:
            report.add(f"- {label}: started in {time.monotonic() - t0:.1f} s")
            compare(report, label, teacher_forced(m, tokens), want)
            timing(report, label, m, a.prefill, a.decode, weight_bytes, a.bandwidth_gbs)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    p.add_argument("--out", type=Path, default=Path("gpu-results"))
    p.add_argument("--work", type=Path, default=Path("/tmp/shardllama-gpu-check"), help="where models are written")
    p.add_argument("--no-big", action="store_true", help="skip the random 7B-shaped f16 model")
    p.add_argument("--tokens", type=int, default=128, help="teacher-forced positions compared")
    p.add_argument("--prefill", type=int, default=512)
    p.add_argument("--decode", type=int, default=64)
    p.add_argument("--bandwidth-gbs", type=float, default=4800.0, help="the GPU's memory bandwidth (H200: 4800)")
    a = p.parse_args(argv)
    a.work.mkdir(parents=True, exist_ok=True)
    report = Report(a.out)
    gpus = torch.cuda.device_count() if a.device == "cuda" else 0
    names = [torch.cuda.get_device_name(i) for i in range(gpus)]
    report.add(f"# shardllama GPU check, {time.strftime('%Y-%m-%d %H:%M %Z')}\n\n"
               f"torch {torch.__version__} (CUDA {torch.version.cuda}), Python {platform.python_version()}, "
               f"{platform.node()}; GPUs: {', '.join(names) or 'none'}; device mode: {a.device}",
               torch=torch.__version__, gpus=names)
    if a.device == "cuda" and not gpus:
        report.add("no GPU visible: nothing to check (run with --device cpu for the dry run)")
        return 1
    if a.device == "cpu":
        devices = [["cpu"], ["cpu", "cpu"]]
    else:
        devices = [["cuda:0"]] + ([[f"cuda:{i}" for i in range(gpus)]] if gpus > 1 else [])
        if gpus < 2:
            report.add("- one GPU only: NCCL across GPUs not run")
    small = make_model(a.work, "small-random-f16", **SMALL)
    check_model(report, a, small, "small random", devices)
    if not a.no_big:
        big = make_model(a.work, "llama-7b-random-f16", shape="7b")
        check_model(report, a, big, "7B-shaped random f16", devices)
    report.add(f"\nresults in {a.out / 'results.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
