"""shardllama against llama.cpp on the same GGUF files, in one run: decode, prefill, GB/s, memory.

    python tools/bench_llamacpp.py                                   # demo model f16 + f32, then random 7B f16
    python tools/bench_llamacpp.py --models demo-f16 --rounds 1 --repeat 1 --decode-tokens 8   # a quick look
    python tools/bench_llamacpp.py --models demo-q4_k_m 7b-q4_k_m --workers 2 --dtypes auto int8   # quantized files
    python tools/bench_llamacpp.py --models 7b-f16 --rounds 2 --repeat 1 --append   # add rows to the last run
    python tools/bench_llamacpp.py --models path/to/model.gguf --workers 1 2 --llama-threads 1 2
    python tools/bench_llamacpp.py --models 7b-f16 --workers 2 --prefill-precisions f32 bf16 --rounds 2 --repeat 1
    python tools/bench_llamacpp.py --models demo-f32 --workers 2 --baseline ../before   # a change against its parent

Needs llama-cpp-python, the project's optional ``bench`` extra (never a test dependency); it compiles
llama.cpp from source (~5-10 minutes on 2 cores).  Which build, by CPU kind:

    CMAKE_ARGS="-DGGML_NATIVE=ON" pip install -e '.[bench]'       # tuned to this CPU
    CMAKE_ARGS="-DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_AVX512=ON \
        -DGGML_AVX512_VBMI=ON -DGGML_AVX512_VNNI=ON -DGGML_AVX512_BF16=ON -DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF \
        -DGGML_AMX_BF16=OFF" pip install --force-reinstall --no-deps --no-binary llama-cpp-python llama-cpp-python==0.3.36

The native build runs every file here on the Intel kind as this project's VMs have it (Xeon family 6 model
207, whose hypervisor does not expose AMX: checked 2026-12-03 on Q4_0, Q4_1, Q4_K_M, Q8_0, f16, f32) and
is the one to use on AMD.  On an Intel host that does expose AMX, a native build dies with a general
protection fault in libggml-cpu on every quantized file (its AMX path; the issue of 2026-12-02); the second
build, AVX-512 without AMX, runs them there.  The table's header says which build was timed: the CPU
features its ggml was compiled for (``llama_print_system_info``), and any this CPU has that it leaves out.

Models (tools/bench_models.py): ``demo-f16`` / ``demo-f32`` (the demo model dequantized), ``7b-f16`` (a
random-weight LLaMA-7B, 13.5 GB), and those f16 files quantized by llama.cpp's own quantizer:
``demo-q4_0``, ``demo-q4_k_m``, ``demo-q8_0``, ``7b-q4_0``, ``7b-q4_k_m``, ``7b-q8_0`` (and ``-q5_k_m``),
written into ``~/.cache/shardllama/bench/`` on first use; or a path to any llama GGUF.  shardllama loads a
file with each ``--dtypes`` (default ``auto``: what the CLI does with no --dtype -- a quantized file's own
block types once shardllama computes on them in place, int8 before; ``int8`` or ``f16`` to compare); the
``weights`` column says what it became.

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
- vs llama.cpp: llama.cpp's time / ours on the same model (llama.cpp with the most threads), so > 1 is
  faster than llama.cpp.
- start-up s: command to first token, as a person waits for it: a fresh process's wall time from its own
  start (the kernel's start time of the process, so the interpreter's start and every import count) until
  the logits of its first prompt (the warm-up's ``--decode-after`` tokens) are back, model load included.
  shardllama starts its workers as the command does (forked right after its imports, ``shardllama.launch``)
  and writes private shards; "kept" is a second fresh process mapping the shards a first one kept
  (``--keep-shards``; with ``--no-kept-startup``, not measured).  The set is removed again unless it was there
  before.  Median over rounds; other processes' CPU is not checked for these.
- GB/s: weight bytes one decode step reads / decode time: for llama.cpp the file's tensors but the
  embedding table (read a row at a time) unless the output head is tied to it; for shardllama its
  workers' shared-memory segments, i.e. the weights in the form it computes on.
- shm weights GB (× file): the workers' segments in shared memory, and their ratio to the bytes of the
  same tensors in the file (the issue's target for weights kept in place: <= 1.15x).  The coordinator's
  embedding table (f32) is its own segment, stated in the notes with the total.
- peak memory: llama.cpp's peak RSS (the mapped model file counts in it); shardllama's largest sum of PSS
  over the coordinator and its workers, read between phases (shared-memory shards count once, split
  among the processes that map them): weights, embedding, KV cache and every interpreter.  GB are 10^9
  bytes throughout.

Writes ``<out>.json`` (every sample, the settings, machine and versions) and ``<out>.md`` (the table) with
``--out`` (default ``tools/results/bench-llamacpp``); ``--append`` adds to the models already there.
Run it alone on the machine: on a shared one, under ``flock /tmp/bench.lock``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# As a script, tools/ comes first on sys.path: put this checkout ahead of any installed shardllama, so the
# engine timed is the one beside this file (the workers then import it from there too).
# Its helpers beside it (tools/) come second, also where this file is imported rather than run (the tests).
sys.path[:0] = [str(ROOT), str(ROOT / "tools")]

from bench_models import MODELS, decode_bytes, model_path, tensor_types  # noqa: E402
from bench_report import describe_build, machine, markdown, versions  # noqa: E402
from bench_timing import clean, first_token, measure, median_of  # noqa: E402


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
        shm = {part: seg.nbytes() for part, seg in store.segments.items()} if store is not None else None
        dtype = dtype_name(model.dtype)
    return dict(out, load_s=load_s, shm_bytes=shm, dtype=dtype)


def dtype_name(dtype) -> str:
    """The --dtype name of the weight dtype a model was loaded in (``gguf`` for a file's own blocks)."""
    from shardllama.model import DTYPES

    return next((name for name, d in DTYPES.items() if d == dtype), str(dtype).removeprefix("torch."))


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


def configs(a: argparse.Namespace) -> list[dict]:
    def plural(n: int) -> str:
        return f"{n} worker{'s' * (n > 1)}"

    mine = [dict(engine="shardllama", workers=n, dtype=d, prefill_precision=p,
                 label=f"shardllama{'' if d == 'auto' else f' {d}'}{'' if p == 'f32' else f' {p} prefill'}, {plural(n)}")
            for d in a.dtypes for p in a.prefill_precisions for n in a.workers]
    mine += [dict(engine="shardllama", workers=n, dtype="int8", label=f"shardllama int8, {plural(n)}")
             for n in a.int8_workers if "int8" not in a.dtypes or n not in a.workers]
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


def summary(c: dict, results: list[dict], step_bytes: int, prompt_lens: list[int]) -> dict:
    """One configuration's row: medians over its runs' calm samples (:func:`clean`), and for shardllama its
    shared memory against the ``step_bytes`` of the same tensors in the file."""
    ok = [r for r in results if "error" not in r]
    row = dict(engine=c["engine"], label=c["label"], threads=c.get("threads"), workers=c.get("workers"),
               dtype_asked=c.get("dtype"),
               errors=[r["error"] for r in results if "error" in r], samples=ok)
    if ok:
        decode, dropped = clean([pair for r in ok for pair in zip(r["decode_ms"], r["decode_foreign"])])
        prefill = {}
        for n in map(str, prompt_lens):  # str keys, as they come back from JSON
            prefill[n], more = clean([pair for r in ok
                                      for pair in zip(r["prefill_tok_s"][n], r["prefill_foreign"][n])])
            dropped += more
        read = step_bytes  # what a decode step reads: the file's tensors, or shardllama's shards of them
        if ok[-1].get("shm_bytes"):
            shm = ok[-1]["shm_bytes"]  # the coordinator's embedding ("emb") and one segment per worker
            read = sum(n for part, n in shm.items() if part != "emb")
            row.update(shm_weights_gb=read / 1e9, shm_embedding_gb=shm.get("emb", 0) / 1e9,
                       shm_ratio=read / step_bytes)
        row.update(decode_ms=statistics.median(decode), decode_ms_min=min(decode), decode_ms_max=max(decode),
                   dtype=ok[-1].get("dtype"), gb_s=read / 1e9 / (statistics.median(decode) / 1000),
                   prefill_tok_s={n: statistics.median(v) for n, v in prefill.items()},
                   disturbed=dropped, samples_total=sum(len(r["decode_ms"]) * (1 + len(prompt_lens)) for r in ok),
                   peak_memory_gb=max(r["memory_gb"] for r in ok),
                   load_s=statistics.median(r["load_s"] for r in ok), top5=ok[-1]["top5"],
                   startup_s=median_of(ok, "startup_s"), startup_kept_s=median_of(ok, "startup_kept_s"))
    return row


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
    rows = [summary(c, runs[c["label"]], step_bytes, a.prompt_lens) for c in configs(a)]
    return dict(model=name if name in MODELS else path.name, date=time.strftime("%Y-%m-%d"), path=str(path),
                file_gb=path.stat().st_size / 1e9, weight_bytes=total_bytes, decode_bytes_per_token=step_bytes,
                tensor_types=tensor_types(path),
                settings=settings, rows=rows, wall_s=time.perf_counter() - t0, shardllama_commit=a.commit)


def main() -> int:
    if len(sys.argv) == 4 and sys.argv[1] == "--child":
        return child(sys.argv[2], sys.argv[3])
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", nargs="+", default=["demo-f16", "demo-f32", "7b-f16"],
                   help=f"model names ({', '.join(MODELS)}) or GGUF paths")
    p.add_argument("--workers", type=int, nargs="+", default=[1, 2], help="shardllama worker counts")
    p.add_argument("--dtypes", nargs="+", default=["auto"],
                   help="shardllama's --dtype on --workers: auto (the CLI's default: a quantized file's own types), "
                        "int8, f16, f32, ...")
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
    from shardllama.model import DTYPES

    if unknown := [d for d in a.dtypes if d != "auto" and d not in DTYPES]:
        p.error(f"--dtypes: {', '.join(unknown)} not among auto, {', '.join(DTYPES)}")
    a.prompt_lens = sorted(a.prompt_lens)
    if max(a.prompt_lens + [a.decode_after + a.decode_tokens]) > a.n_ctx:
        p.error("--n-ctx is smaller than the longest prompt or decode run")

    json_path, md_path = a.out.with_suffix(".json"), a.out.with_suffix(".md")
    host = machine()
    result = dict(date=time.strftime("%Y-%m-%d"), machine=host, versions=versions(host["flags"]), models=[])
    print(f"llama.cpp: {describe_build(result['versions'])}", file=sys.stderr)
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
