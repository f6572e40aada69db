"""How tools/bench_llamacpp.py times an engine on a machine others may use: the same token ids for both
engines, a stopwatch that counts other processes' CPU, a sampler that waits for quiet and retries, and the
measurement sequence (start-up, warm-up, prefill, decode) one engine subprocess runs.  See that tool's
docstring for what the figures mean."""

from __future__ import annotations

import os
import statistics
import time
from pathlib import Path


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


def median_of(runs: list[dict], key: str) -> float | None:
    """The median of ``key`` over the runs that have it (None where none has)."""
    values = [r[key] for r in runs if r.get(key) is not None]
    return statistics.median(values) if values else None


def clean(samples: list[tuple[float, float]]) -> tuple[list[float], int]:
    """The values of the (value, foreign CPU) samples that no other process disturbed (all of them if every
    one was), and how many were disturbed."""
    calm = [x for x, f in samples if f <= DISTURBED]
    return calm or [x for x, _ in samples], len(samples) - len(calm)

