"""shardllama against llama.cpp on the same GGUF files, in one run: decode, prefill, GB/s, peak memory.

    python tools/bench_llamacpp.py                                   # demo model f16 + f32, then random 7B f16
    python tools/bench_llamacpp.py --models demo-f16 --rounds 1 --repeat 1 --decode-tokens 8   # a quick look
    python tools/bench_llamacpp.py --models 7b-f16 --rounds 2 --repeat 1 --append   # add rows to the last run
    python tools/bench_llamacpp.py --models path/to/model.gguf --workers 1 2 --llama-threads 1 2
    python tools/bench_llamacpp.py --models 7b-f16 --workers 2 --prefill-precisions f32 bf16 --rounds 2 --repeat 1
    python tools/bench_llamacpp.py --models demo-f32 --workers 2 --baseline ../before   # a change against its parent

Needs llama-cpp-python, the project's optional ``bench`` extra (never a test dependency); it compiles
llama.cpp from source (~5 minutes on 2 cores), natively for this CPU with::

    CMAKE_ARGS="-DGGML_NATIVE=ON" pip install -e '.[bench]'

Models: ``demo-f16`` / ``demo-f32`` are the demo model (SmolLM2-135M-Instruct, shipped as Q4_1, which
llama-cpp-python 0.3.36 crashes on) rewritten with every matrix dequantized; ``7b-f16`` is a random-weight
LLaMA-7B (dim 4096, 32 layers, FFN 11008, vocab 32000; 13.5 GB).  ``demo-q4_k_m``, ``7b-q8_0``... (Q4_0,
Q4_K_M, Q5_K_M, Q8_0) are those f16 files quantized by llama.cpp's own quantizer; shardllama loads them as
it loads any quantized file (today: as int8).  tools/make_gguf.py writes them once into
``~/.cache/shardllama/bench/`` (``$SHARDLLAMA_CACHE``); a path to any llama GGUF works too.

How it measures.  Every engine configuration -- llama.cpp with ``--llama-threads`` threads, shardllama with
``--workers`` N worker processes (one torch thread each, the default) -- runs in a fresh subprocess that
loads the model, warms up (a short prompt and four decode steps, which page in every weight) and then
``--repeat`` times: prefill of each ``--prompt-lens`` prompt in one call on an empty cache, and decode of
``--decode-tokens`` tokens one at a time after a ``--decode-after``-token prompt.  The configurations take
turns, ``--rounds`` times, so that a busy moment of the machine hits them alike and only one model copy is
ever in memory (the 7B f16 file is 13.5 GB; this machine kind has 24 GB).  Figures are medians over all
rounds x repeats.  The machine may be shared: before each measurement the tool waits (``--max-wait``) until
other processes leave the CPUs alone, counts the CPU they take while it runs (/proc/stat against the engine's
own processes) and measures again (``--retries``) when that exceeded 0.1 core; samples still disturbed are
left out of the medians unless all were, and the table says how many.

Both engines get the same token ids (seeded random ids, no text, no sampling), so the engines are timed,
not tokenizers: llama.cpp through ``Llama.eval`` / ``reset`` (``n_batch`` 512, logits of the last token
only), shardllama through ``open_model`` and its Backend's ``forward`` (logits of the last token, as the
generation loop asks).  The five likeliest next tokens after the last decode run are compared between the
engines, a check that both compute the same model.

- decode ms/token: the time of a decode run divided by its tokens.
- GB/s: weight bytes one decode step reads (every tensor but the embedding table, which is read one row at
  a time -- unless the output head is tied to it) / decode time.  What decoding is bound by.
- vs llama.cpp: llama.cpp's time / ours on the same model (llama.cpp with the most threads), so > 1 is
  faster than llama.cpp.
- start-up s: command to first token, as a person waits for it: a fresh process's wall time from its own
  start (the kernel's start time of the process, so the interpreter's start and every import count) until
  the logits of its first prompt (the warm-up's ``--decode-after`` tokens) are back, model load included.
  shardllama starts its workers as the command does (forked right after its imports, ``shardllama.launch``)
  and writes private shards; "kept" is a second fresh process mapping the shards a first one kept
  (``--keep-shards``; with ``--no-kept-startup``, not measured).  The set is removed again unless it was there
  before.  Median over rounds; other processes' CPU is not checked for these.
- peak memory: llama.cpp's peak RSS (the mapped model file counts in it); shardllama's largest sum of PSS
  over the coordinator and its workers, read between phases (shared-memory shards count once, split
  among the processes that map them).  ``shm_gb`` in the JSON is the size of the shards themselves.  GB
  are 10^9 bytes throughout.

Writes ``<out>.json`` (every sample, the settings, machine and versions) and ``<out>.md`` (the table) with
``--out`` (default ``tools/results/bench-llamacpp``); ``--append`` adds to the models already there.
Run it alone on the machine: on a shared one, under ``flock /tmp/bench.lock``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# As a script, tools/ comes first on sys.path: put this checkout ahead of any installed shardllama, so the
# engine timed is the one beside this file (the workers then import it from there too).
sys.path.insert(0, str(ROOT))

# ---- models ---------------------------------------------------------------------------------------------

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
            raise SystemExit(f"bench_llamacpp: {name}: neither a model name ({', '.join(MODELS)}) nor a file")
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
        raise SystemExit(f"bench_llamacpp: llama.cpp could not quantize {src} to {qtype}")
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


# ---- one engine in one subprocess -----------------------------------------------------------------------


def token_ids(vocab: int, n: int, seed: int) -> list[int]:
    """Seeded random ids, skipping the first few (control tokens in both demo and LLaMA vocabularies)."""
    import random

    rng = random.Random(seed)
    return [rng.randrange(16, vocab) for _ in range(n)]


class Stopwatch:
    """Wall time of a section, and how much CPU other processes took meanwhile (in cores: 0.5 = half a core
    on average).  The machine may be shared: a sample that other work disturbed is flagged and left out."""

    TICK = os.sysconf("SC_CLK_TCK")

    def __init__(self, pids):
        self.pids = pids  # () -> the processes of the engine under test

    def _busy(self) -> tuple[int, int, int]:
        cpu = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
        busy = cpu[0] + cpu[1] + cpu[2] + cpu[5] + cpu[6]  # user nice system irq softirq (guest is in user)
        ours, pids = 0, self.pids()
        for pid in pids:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            ours += int(fields[11]) + int(fields[12])  # utime stime, all threads
        return busy, ours, len(pids)

    def __enter__(self) -> "Stopwatch":
        self._b0, self._o0, _ = self._busy()
        self.t0 = time.perf_counter()
        return self

    def __exit__(self, *exc) -> None:
        self.seconds = time.perf_counter() - self.t0
        b1, o1, n = self._busy()
        # The system counts in sampled ticks, a process's times are rounded down to ticks: allow for a tick or
        # two of disagreement per process, which makes samples of a few ticks impossible to judge.
        slack = 1 + 2 * n
        self.foreign = max(0, (b1 - self._b0) - (o1 - self._o0) - slack) / self.TICK / self.seconds


# A sample during which other processes took more than this (in cores) is disturbed.
DISTURBED = 0.1


class Sampler:
    """Times one measurement at a time on a machine that others may be using: waits (up to ``max_wait`` s)
    until other processes leave the CPUs alone for a second, runs it, and runs it again (up to ``retries``
    times) if they took more than ``DISTURBED`` cores meanwhile.  Keeps the last try either way."""

    def __init__(self, pids, retries: int, max_wait: float):
        self.pids, self.retries, self.max_wait = pids, retries, max_wait
        self.waited_s = 0.0
        self.tries = 0

    def _wait_quiet(self) -> None:
        deadline = time.perf_counter() + self.max_wait
        while time.perf_counter() < deadline:
            with Stopwatch(self.pids) as w:
                time.sleep(1.0)
            self.waited_s += w.seconds
            if w.foreign <= DISTURBED:
                return

    def __call__(self, prepare, run) -> Stopwatch:
        for _ in range(self.retries + 1):
            prepare()
            self._wait_quiet()
            self.tries += 1
            with Stopwatch(self.pids) as w:
                run()
            if w.foreign <= DISTURBED:
                break
        return w


def first_token(forward, reset, vocab: int, cfg: dict) -> float:
    """The first prompt (the warm-up's ``decode_after`` ids): seconds from this process's start to its logits."""
    from shardllama.phases import process_start

    reset()
    forward(token_ids(vocab, cfg["decode_after"], seed=1), 0)
    return time.perf_counter() - process_start()


def measure(forward, reset, top, vocab: int, cfg: dict, sample_memory, pids) -> dict:
    """Start-up (:func:`first_token`, which also warms up), then ``repeat`` times: prefill of each prompt
    length, and a decode run.  ``top()`` gives the five likeliest next ids after the last forward pass: read
    once per decode run, outside the timing, to check that both engines compute the same model.  Every
    sample comes with the CPU other processes took while it ran (``*_foreign``, in cores)."""
    prompt = token_ids(vocab, max(cfg["prompt_lens"] + [cfg["decode_after"]]), seed=1)
    steps = token_ids(vocab, cfg["decode_tokens"], seed=2)
    startup_s = first_token(forward, reset, vocab, cfg)  # warm-up: pages every weight in, builds kernels
    memory = [sample_memory()]
    for i, t in enumerate(steps[:4]):
        forward([t], cfg["decode_after"] + i)
    memory.append(sample_memory())
    prefill = {str(n): [] for n in cfg["prompt_lens"]}
    prefill_foreign = {str(n): [] for n in cfg["prompt_lens"]}
    decode, decode_foreign, tops = [], [], []
    sample = Sampler(pids, cfg["retries"], cfg["max_wait"])

    def decode_prompt() -> None:
        reset()
        forward(prompt[: cfg["decode_after"]], 0)

    def decode_run() -> None:
        for i, t in enumerate(steps):
            forward([t], cfg["decode_after"] + i)

    for _ in range(cfg["repeat"]):
        for n in cfg["prompt_lens"]:
            w = sample(reset, lambda: forward(prompt[:n], 0))
            prefill[str(n)].append(n / w.seconds)
            prefill_foreign[str(n)].append(w.foreign)
        w = sample(decode_prompt, decode_run)
        decode.append(1000 * w.seconds / len(steps))
        decode_foreign.append(w.foreign)
        tops.append(top())
        memory.append(sample_memory())
    return dict(prefill_tok_s=prefill, prefill_foreign=prefill_foreign, decode_ms=decode,
                decode_foreign=decode_foreign, memory_gb=max(memory), top5=tops[-1], tries=sample.tries,
                waited_s=sample.waited_s, startup_s=startup_s)


def run_llamacpp(cfg: dict) -> dict:
    from llama_cpp import Llama

    t0 = time.perf_counter()
    llm = Llama(cfg["path"], n_threads=cfg["threads"], n_threads_batch=cfg["threads"], n_ctx=cfg["n_ctx"],
                n_batch=512, verbose=False)
    load_s = time.perf_counter() - t0

    def forward(tokens: list[int], pos: int) -> None:
        assert llm.n_tokens == pos, (llm.n_tokens, pos)
        llm.eval(tokens)

    def top() -> list[int]:
        import llama_cpp
        import numpy as np

        logits = np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(llm.ctx, -1), shape=(llm.n_vocab(),))
        return [int(i) for i in np.argsort(-logits, kind="stable")[:5]]

    def peak_rss_gb() -> float:
        # VmHWM, not getrusage's ru_maxrss: that one keeps the high-water mark of the process before exec,
        # i.e. of the parent that forked it.
        status = Path("/proc/self/status").read_text()
        return int(next(x for x in status.splitlines() if x.startswith("VmHWM")).split()[1]) * 1024 / 1e9

    out = measure(forward, llm.reset, top, llm.n_vocab(), cfg, peak_rss_gb, lambda: [os.getpid()])
    llm.close()
    return dict(out, load_s=load_s)


def run_shardllama(cfg: dict) -> dict:
    import psutil
    import torch

    from shardllama.launch import LocalWorkers
    from shardllama.kv_cache import blocks_for, contiguous_tables
    from shardllama.runtime import open_model

    torch.set_num_threads(1)  # the coordinator's own work (embedding lookup, sums) stays on one thread
    t0 = time.perf_counter()
    with LocalWorkers(cfg["workers"]) as early:  # as the command starts them: forked after the imports
        model = open_model(cfg["path"], workers=cfg["workers"], max_seq_len=cfg["n_ctx"], dtype=cfg.get("dtype", "auto"),
                           keep_shards=cfg.get("keep_shards", False), local_workers=early,
                           prefill_precision=cfg.get("prefill_precision", "f32"))
    load_s = time.perf_counter() - t0
    if cfg.get("startup_only"):
        return startup_only(model, cfg)
    with model:
        backend = model.backend
        pids = [os.getpid(), *backend.pids]
        table = contiguous_tables(torch.tensor([0]), blocks_for(backend.max_seq_len))
        last: list[torch.Tensor] = []

        def forward(tokens: list[int], pos: int) -> None:
            last[:] = [backend.forward(torch.tensor([tokens]), torch.tensor([pos]), table)]

        def top() -> list[int]:
            return torch.argsort(last[0][0], descending=True, stable=True)[:5].tolist()

        def pss_gb() -> float:
            return sum(psutil.Process(p).memory_full_info().pss for p in pids) / 1e9

        out = measure(forward, lambda: None, top, model.args.vocab_size, cfg, pss_gb, lambda: pids)
        store = getattr(backend, "store", None)
        shm_gb = store.nbytes() / 1e9 if store is not None else None
        dtype = str(model.dtype).removeprefix("torch.")
    return dict(out, load_s=load_s, shm_gb=shm_gb, dtype=dtype)


def startup_only(model, cfg: dict) -> dict:
    """A kept-shards run: its start-up, and whether it wrote the set (else it mapped it) of which key."""
    import torch

    from shardllama.kv_cache import blocks_for, contiguous_tables
    from shardllama.shm import shard_key

    with model:
        backend = model.backend
        table = contiguous_tables(torch.tensor([0]), blocks_for(backend.max_seq_len))
        startup_s = first_token(lambda tokens, pos: backend.forward(torch.tensor([tokens]), torch.tensor([pos]), table),
                                lambda: None, model.args.vocab_size, cfg)
        wrote = bool(backend.store.owned)
    return dict(startup_s=startup_s, wrote=wrote, key=shard_key(model.path, model.dtype, cfg["workers"]))


def kept_startup(cfg: dict, timeout: float) -> dict:
    """shardllama's start-up with kept shards: one fresh process keeps them (writing them unless they are there
    already), a second maps them and is timed; the set is removed after unless it was there before."""
    cfg = dict(cfg, keep_shards=True, startup_only=True)
    first = run_config(cfg, timeout)
    if "error" in first:
        return first
    try:
        second = run_config(cfg, timeout)
    finally:
        if first["wrote"]:
            from shardllama.shm import clean_kept

            clean_kept(first["key"])
    if "error" not in second and second["wrote"]:
        return dict(error="the second process wrote the shards again instead of mapping the kept ones")
    return second


def child(cfg_file: str, out_file: str) -> int:
    cfg = json.loads(Path(cfg_file).read_text())
    result = run_llamacpp(cfg) if cfg["engine"] == "llama.cpp" else run_shardllama(cfg)
    Path(out_file).write_text(json.dumps(result))
    return 0


def run_config(cfg: dict, timeout: float) -> dict:
    """One configuration in a fresh subprocess; its figures, or an ``error``."""
    with tempfile.TemporaryDirectory(prefix="bench-llamacpp-") as d:
        cfg_file, out_file = Path(d, "cfg.json"), Path(d, "out.json")
        cfg_file.write_text(json.dumps(cfg))
        # A baseline configuration runs the baseline checkout's own copy of this tool, which times that engine.
        script = Path(cfg["src"]) / "tools" / "bench_llamacpp.py" if "src" in cfg else Path(__file__).resolve()
        cmd = [sys.executable, str(script), "--child", str(cfg_file), str(out_file)]
        try:
            proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            return dict(error=f"timed out after {timeout:.0f} s")
        if proc.returncode != 0 or not out_file.exists():
            tail = proc.stdout.strip().splitlines()[-3:]
            return dict(error=f"exit code {proc.returncode}: {' / '.join(tail)}")
        return json.loads(out_file.read_text())


# ---- the run --------------------------------------------------------------------------------------------


def median_of(runs: list[dict], key: str) -> float | None:
    """The median of ``key`` over the runs that have it (None where none has)."""
    values = [r[key] for r in runs if r.get(key) is not None]
    return statistics.median(values) if values else None


def clean(samples: list[tuple[float, float]]) -> tuple[list[float], int]:
    """The values of the (value, foreign CPU) samples that no other process disturbed (all of them if every
    one was), and how many were disturbed."""
    calm = [x for x, f in samples if f <= DISTURBED]
    return calm or [x for x, _ in samples], len(samples) - len(calm)


def configs(a: argparse.Namespace) -> list[dict]:
    mine = ([dict(engine="shardllama", workers=n, prefill_precision=p,
                  label=f"shardllama{'' if p == 'f32' else f' {p} prefill'}, {n} worker{'s' * (n > 1)}")
             for p in a.prefill_precisions for n in a.workers]
            + [dict(engine="shardllama", workers=n, dtype="int8", label=f"shardllama int8, {n} worker{'s' * (n > 1)}")
               for n in a.int8_workers])
    baseline = []
    if a.baseline is not None:
        rev = git_rev(a.baseline)
        baseline = [dict(c, src=str(a.baseline.resolve()), label=c["label"].replace("shardllama", f"shardllama@{rev}", 1))
                    for c in mine]
    return ([dict(engine="llama.cpp", threads=t, label=f"llama.cpp, {t} thread{'s' * (t > 1)}")
             for t in a.llama_threads] + mine + baseline)


def git_rev(checkout: Path) -> str:
    """The short commit of a checkout (``--baseline``), or its directory name outside git."""
    try:
        return subprocess.run(["git", "-C", str(checkout), "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return checkout.name


def bench_model(name: str, a: argparse.Namespace) -> dict:
    path = model_path(name)
    step_bytes, total_bytes = decode_bytes(path)
    settings = dict(rounds=a.rounds, repeat=a.repeat, prompt_lens=a.prompt_lens, decode_tokens=a.decode_tokens,
                    decode_after=a.decode_after, n_ctx=a.n_ctx, retries=a.retries, max_wait=a.max_wait)
    runs: dict[str, list[dict]] = {c["label"]: [] for c in configs(a)}
    t0 = time.perf_counter()
    for r in range(a.rounds):
        for c in configs(a):
            t = time.perf_counter()
            res = run_config(dict(c, path=str(path), **settings), a.timeout)
            if c["engine"] == "shardllama" and a.kept_startup and "error" not in res:
                kept = kept_startup(dict(c, path=str(path), **settings), a.timeout)
                res["startup_kept_s"] = kept.get("startup_s")
                if "error" in kept:
                    print(f"{name}: kept-shards start-up of {c['label']} failed: {kept['error']}", file=sys.stderr)
            res["wall_s"] = time.perf_counter() - t
            runs[c["label"]].append(res)
            shown = (f"decode {statistics.median(res['decode_ms']):.1f} ms/token, prefill "
                     + ", ".join(f"{n}: {statistics.median(v):.0f}" for n, v in res["prefill_tok_s"].items())
                     + f" tok/s, {res['memory_gb']:.2f} GB; other processes took up to "
                     + f"{max([*res['decode_foreign'], *sum(res['prefill_foreign'].values(), [])]):.2f} cores; "
                     + f"{res['tries']} tries for {len(res['decode_ms']) * (1 + len(a.prompt_lens))} samples, "
                     + f"{res['waited_s']:.0f} s waiting for quiet; start-up {res['startup_s']:.2f} s"
                     + (f", kept {res['startup_kept_s']:.2f} s" if res.get("startup_kept_s") is not None else "")
                     if "error" not in res else f"FAILED: {res['error']}")
            print(f"{name} round {r + 1}/{a.rounds}, {c['label']}: {shown} ({res['wall_s']:.0f} s)", file=sys.stderr)
    rows = []
    for c in configs(a):
        ok = [r for r in runs[c["label"]] if "error" not in r]
        row = dict(engine=c["engine"], label=c["label"], threads=c.get("threads"), workers=c.get("workers"),
                   errors=[r["error"] for r in runs[c["label"]] if "error" in r], samples=ok)
        if ok:
            decode, dropped = clean([pair for r in ok for pair in zip(r["decode_ms"], r["decode_foreign"])])
            prefill = {}
            for n in map(str, a.prompt_lens):  # str keys, as they come back from JSON
                prefill[n], more = clean([pair for r in ok
                                          for pair in zip(r["prefill_tok_s"][n], r["prefill_foreign"][n])])
                dropped += more
            row.update(decode_ms=statistics.median(decode), decode_ms_min=min(decode), decode_ms_max=max(decode),
                       gb_s=step_bytes / 1e9 / (statistics.median(decode) / 1000),
                       prefill_tok_s={n: statistics.median(v) for n, v in prefill.items()},
                       disturbed=dropped, samples_total=sum(len(r["decode_ms"]) * (1 + len(a.prompt_lens)) for r in ok),
                       peak_memory_gb=max(r["memory_gb"] for r in ok),
                       load_s=statistics.median(r["load_s"] for r in ok), top5=ok[-1]["top5"],
                       startup_s=median_of(ok, "startup_s"), startup_kept_s=median_of(ok, "startup_kept_s"))
        rows.append(row)
    return dict(model=name if name in MODELS else path.name, date=time.strftime("%Y-%m-%d"), path=str(path),
                file_gb=path.stat().st_size / 1e9, weight_bytes=total_bytes, decode_bytes_per_token=step_bytes,
                settings=settings, rows=rows, wall_s=time.perf_counter() - t0, shardllama_commit=a.commit)


def machine() -> dict:
    info: dict[str, str] = {}
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        key, _, value = line.partition(":")
        key = key.strip()
        if key in ("model name", "cpu family", "model", "stepping") and key not in info:
            info[key] = value.strip()
        if key == "flags" and "flags" not in info:
            keep = ("avx2", "avx512f", "avx512_bf16", "avx512_fp16", "amx_tile", "f16c", "fma")
            info["flags"] = " ".join(f for f in value.split() if f in keep)
    mem = next(line for line in Path("/proc/meminfo").read_text().splitlines() if line.startswith("MemTotal"))
    return dict(cpu=info.get("model name", platform.processor()), cpu_family=info.get("cpu family"),
                cpu_model=info.get("model"), flags=info.get("flags", ""), cpus=len(os.sched_getaffinity(0)),
                mem_gib=round(int(mem.split()[1]) / 2**20, 1), kernel=platform.release())


def versions() -> dict:
    import llama_cpp
    import torch

    try:
        commit = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True,
                                text=True, check=True).stdout.strip()
        # What is timed: the engine's code, not the tests or results beside it.
        dirty = subprocess.run(["git", "-C", str(ROOT), "status", "--porcelain", "--untracked-files=no", "--",
                                "shardllama", "workers", "tools"],
                               capture_output=True, text=True, check=True).stdout.strip()
        commit += "+changes" if dirty else ""
    except (OSError, subprocess.CalledProcessError):
        commit = None
    from importlib.metadata import version

    return dict(torch=torch.__version__, llama_cpp_python=llama_cpp.__version__, shardllama=version("shardllama"),
                shardllama_commit=commit, python=platform.python_version(),
                llama_cpp_system=llama_cpp.llama_print_system_info().decode().strip())


# ---- report ---------------------------------------------------------------------------------------------


def markdown(result: dict) -> str:
    m, v = result["machine"], result["versions"]
    lines = [
        f"shardllama vs llama.cpp, {result['date']}: {m['cpu']} (family {m['cpu_family']} model {m['cpu_model']}; "
        f"{m['flags']}), {m['cpus']} CPUs, {m['mem_gib']} GiB; torch {v['torch']}, llama-cpp-python "
        f"{v['llama_cpp_python']}, shardllama {v['shardllama']} ({v['shardllama_commit']}).",
        "",
    ]
    lens = sorted({n for mod in result["models"] for n in mod["settings"]["prompt_lens"]})
    head = (["model", "engine", "decode ms/token (min–max)", "GB/s", "decode vs llama.cpp"]
            + [f"prefill {n} tok/s" for n in lens]
            + [f"prefill {lens[-1]} vs llama.cpp", "peak memory GB", "load s", "start-up s", "start-up kept s"])
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    notes = []
    for mod in result["models"]:
        ok = [r for r in mod["rows"] if "decode_ms" in r]
        ref = max((r for r in ok if r["engine"] == "llama.cpp"), key=lambda r: r["threads"], default=None)
        def plain(r: dict) -> bool:  # shardllama with the model's own weights and f32 prefill
            return (r["engine"] == "shardllama" and "int8" not in r["label"] and "prefill" not in r["label"]
                    and "@" not in r["label"])

        one = next((r for r in ok if plain(r) and r["workers"] == 1), None)
        s = mod["settings"]
        last = str(s["prompt_lens"][-1])
        label = f"{mod['model']} ({mod['file_gb']:.2f} GB)"
        for r in mod["rows"]:
            if "decode_ms" not in r:
                lines.append(f"| {label} | {r['label']} | failed: {'; '.join(r['errors'])} |")
                continue
            cells = [label, r["label"], f"{r['decode_ms']:.1f} ({r['decode_ms_min']:.1f}–{r['decode_ms_max']:.1f})",
                     f"{r['gb_s']:.1f}" if "int8" not in r["label"] else "(int8)"]
            cells.append(f"{ref['decode_ms'] / r['decode_ms']:.2f}×" if ref else "")
            cells += [f"{r['prefill_tok_s'][str(n)]:.1f}" if str(n) in r["prefill_tok_s"] else "" for n in lens]
            cells.append(f"{r['prefill_tok_s'][last] / ref['prefill_tok_s'][last]:.2f}×" if ref else "")
            cells += [f"{r['peak_memory_gb']:.2f}", f"{r['load_s']:.1f}"]
            cells += [f"{r[k]:.2f}" if r.get(k) is not None else "" for k in ("startup_s", "startup_kept_s")]
            lines.append("| " + " | ".join(cells) + " |")
        for r in ok:
            if one is not None and plain(r) and r["workers"] > 1:
                notes.append(f"{mod['model']}: {r['workers']} workers over 1: decode "
                             f"{one['decode_ms'] / r['decode_ms']:.2f}×, prefill {last} "
                             f"{r['prefill_tok_s'][last] / one['prefill_tok_s'][last]:.2f}×")
        for r in ok:  # --baseline: each configuration against the same one from the other checkout
            base = next((b for b in ok if "@" in b["label"] and re.sub(r"@[0-9A-Za-z_.-]+", "", b["label"]) == r["label"]), None)
            if base is not None and "@" not in r["label"]:
                notes.append(f"{mod['model']}: {r['label']} against {base['label']}: decode "
                             f"{base['decode_ms'] / r['decode_ms']:.2f}× as fast, prefill {last} "
                             f"{r['prefill_tok_s'][last] / base['prefill_tok_s'][last]:.2f}×")
        if ref is not None:
            same = [f"{r['label']} {len(set(r['top5']) & set(ref['top5']))}/5"
                    + (", same top-1" if r["top5"][0] == ref["top5"][0] else f", top-1 {r['top5'][0]}")
                    for r in ok if r is not ref]
            notes.append(f"{mod['model']}: five likeliest next tokens after the decode run, shared with "
                         f"{ref['label']} (top-1 {ref['top5'][0]}): {'; '.join(same)}")
        n_samples = s["rounds"] * s["repeat"]
        disturbed = ", ".join(f"{r['label']} {r['disturbed']}/{r['samples_total']}" for r in ok if r["disturbed"])
        notes.append(f"{mod['model']}: median of {n_samples} ({s['rounds']} rounds × {s['repeat']}), decode "
                     f"{s['decode_tokens']} tokens after {s['decode_after']}; {mod['wall_s'] / 60:.1f} min"
                     + (f"; samples during which other processes took > {DISTURBED} core, left out: {disturbed}"
                        if disturbed else ""))
    lines += [""] + [f"- {n}" for n in notes]
    return "\n".join(lines) + "\n"


def main() -> int:
    if len(sys.argv) == 4 and sys.argv[1] == "--child":
        return child(sys.argv[2], sys.argv[3])
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", nargs="+", default=["demo-f16", "demo-f32", "7b-f16"],
                   help=f"model names ({', '.join(MODELS)}) or GGUF paths")
    p.add_argument("--workers", type=int, nargs="+", default=[1, 2], help="shardllama worker counts")
    p.add_argument("--int8-workers", type=int, nargs="*", default=[],
                   help="also shardllama with --dtype int8 (weights quantized at load) on these worker counts")
    p.add_argument("--prefill-precisions", nargs="+", choices=("f32", "bf16"), default=["f32"],
                   help="shardllama's prefill precision(s) on --workers (bf16: where the CPU has it, else f32)")
    p.add_argument("--llama-threads", type=int, nargs="+", default=[2], help="llama.cpp thread counts")
    p.add_argument("--rounds", type=int, default=3, help="fresh subprocesses per configuration, taking turns")
    p.add_argument("--repeat", type=int, default=3, help="measurements in each subprocess")
    p.add_argument("--prompt-lens", type=int, nargs="+", default=[64, 128])
    p.add_argument("--decode-tokens", type=int, default=32)
    p.add_argument("--decode-after", type=int, default=8, help="prompt length before decoding")
    p.add_argument("--n-ctx", type=int, default=512, help="context both engines allocate")
    p.add_argument("--retries", type=int, default=3,
                   help="times a measurement is taken again when other processes took > 0.1 core meanwhile")
    p.add_argument("--max-wait", type=float, default=30,
                   help="seconds to wait, before each measurement, for other processes to leave the CPUs alone")
    p.add_argument("--timeout", type=float, default=3600, help="seconds one subprocess may take")
    p.add_argument("--no-kept-startup", dest="kept_startup", action="store_false",
                   help="skip shardllama's start-up with kept shards (two more processes per configuration and round)")
    p.add_argument("--out", type=Path, default=ROOT / "tools" / "results" / "bench-llamacpp")
    p.add_argument("--append", action="store_true", help="add these models to the results already at --out")
    p.add_argument("--baseline", type=Path, metavar="CHECKOUT",
                   help="also time every shardllama configuration from this other checkout (e.g. a git worktree "
                        "of the commit before a change), taking turns with this one: labelled shardllama@<commit>")
    a = p.parse_args()
    a.prompt_lens = sorted(a.prompt_lens)
    if max(a.prompt_lens + [a.decode_after + a.decode_tokens]) > a.n_ctx:
        p.error("--n-ctx is smaller than the longest prompt or decode run")

    json_path, md_path = a.out.with_suffix(".json"), a.out.with_suffix(".md")
    result = dict(date=time.strftime("%Y-%m-%d"), machine=machine(), versions=versions(), models=[])
    a.commit = result["versions"]["shardllama_commit"]
    if a.append and json_path.exists():
        old = json.loads(json_path.read_text())
        names = {n if n in MODELS else Path(n).name for n in a.models}
        result["models"] = [m for m in old["models"] if m["model"] not in names]
    for name in a.models:
        result["models"].append(bench_model(name, a))
        json_path.parent.mkdir(parents=True, exist_ok=True)
        json_path.write_text(json.dumps(result, indent=1))  # after every model: a failure keeps what was done
        md_path.write_text(markdown(result))
    print(markdown(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
