"""The `shardllama` command end to end: real processes, the real demo model, every error path."""

import os
import re
import signal
import subprocess
import sys

import psutil
import pytest
import torch

from shardllama.kernels import blocks

MEANING = " not just a random choice, but a choice made by someone who has chosen to live."


def run_cli(*args, timeout=300, env=None):
    return subprocess.run([sys.executable, "-m", "shardllama", *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, **(env or {})}, stdin=subprocess.DEVNULL)


def test_demo_model_greedy_meaning_of_life(demo_gguf):
    r = run_cli("--model-path", demo_gguf, "--prompt", "The meaning of life is", "--temperature", "0",
                "--max-new-tokens", "24", "--dtype", "f32")
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("The meaning of life is" + MEANING)
    assert "ms/token" in r.stderr and "time to first token" in r.stderr


def test_plain_command_uses_the_cached_demo_model_as_stored_and_quiet_silences_stderr(demo_gguf):
    # No --model-path: the default model, found in the cache the fixture filled.  Its file is Q4_1 (and
    # Q8_0), computed on its own blocks (not widened to f32) where the CPU has AVX-512, widened to f16 where
    # not: either way the same text as an explicit --dtype gguf, llama.cpp's.
    common = ["generate", "--prompt", "The meaning of life is", "--temperature", "0", "--max-new-tokens", "5",
              "--no-echo"]
    env = {"SHARDLLAMA_CACHE": str(demo_gguf.parent)}
    r = run_cli(*common, "-q", env=env)
    assert r.returncode == 0, r.stderr
    assert r.stderr == ""
    explicit = run_cli(*common, "--dtype", "gguf", env=env)
    assert explicit.returncode == 0, explicit.stderr
    assert r.stdout == explicit.stdout and len(r.stdout) > 10
    # The file's own numbers, as f32 computes them: transformers' and llama.cpp's greedy text.
    assert MEANING.startswith(r.stdout.rstrip("\n"))
    loud = run_cli(*common, env=env)
    said = "computed as stored" if blocks.runs_here() else "widened to f16"  # no AVX-512: f16, the same text
    assert f"Q4_1/Q8_0 weights {said}" in loud.stderr.splitlines()[0]


def test_seed_reproduces_and_prompt_file(demo_gguf, tmp_path):
    prompt = tmp_path / "prompt.txt"
    prompt.write_text("Once upon a time", encoding="utf-8")
    runs = [run_cli("--model-path", demo_gguf, "--prompt-file", prompt, "--temperature", "1.0", "--top-k", "0",
                    "--seed", "7", "--max-new-tokens", "12", "-q") for _ in range(2)]
    assert runs[0].returncode == 0, runs[0].stderr
    assert runs[0].stdout == runs[1].stdout
    assert runs[0].stdout.startswith("Once upon a time")


@pytest.mark.parametrize("args, code, fragment", [
    (["--model-path", "/nonexistent/model.gguf", "--prompt", "x"], 1, "/nonexistent/model.gguf"),
    (["--prompt", "x", "--temperature", "-1"], 2, "temperature"),
    (["--prompt", "x", "--top-p", "2"], 2, "top_p"),
    (["--prompt", "x", "--max-seq-len", "0"], 2, "--max-seq-len"),
    (["--prompt", "x", "--max-seq-len", "abc"], 2, "--max-seq-len"),
    (["--prompt", "x", "--dtype", "f8"], 2, "--dtype"),
    (["--prompt", "x", "--prefill-precision", "f16"], 2, "--prefill-precision"),
    (["--prompt", "x", "--no-such-flag"], 2, "--no-such-flag"),
    (["--prompt-file", "/nonexistent/prompt.txt"], 2, "/nonexistent/prompt.txt"),
    (["generate"], 2, "--prompt"),  # (bare `shardllama` prints the help: tests/test_cli_common.py)
    (["-q"], 2, "--prompt"),
])
def test_errors_are_one_line_with_exit_code(args, code, fragment, demo_gguf):
    r = run_cli(*args, env={"SHARDLLAMA_CACHE": str(demo_gguf.parent)}, timeout=120)
    assert r.returncode == code, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("shardllama: error:"), r.stderr
    assert fragment in lines[0]
    assert "Traceback" not in r.stderr


def test_prefill_precision_variable_is_checked_before_the_load_and_the_flag_wins(demo_gguf):
    common = ["--model-path", demo_gguf, "--prompt", "The meaning of life is", "--max-new-tokens", "2", "-q",
              "--workers", "0"]
    bad = {"SHARDLLAMA_PREFILL_PRECISION": "fp8"}
    r = run_cli(*common, env=bad, timeout=120)
    assert r.returncode == 2, r.stderr
    assert r.stderr.strip() == "shardllama: error: SHARDLLAMA_PREFILL_PRECISION must be one of f32, bf16, got 'fp8'"
    r = run_cli(*common, "--prefill-precision", "f32", env=bad, timeout=120)
    assert r.returncode == 0 and r.stderr == "", r.stderr


def test_prompt_longer_than_max_seq_len(demo_gguf):
    r = run_cli("--model-path", demo_gguf, "--prompt", "word " * 40, "--max-seq-len", "16", timeout=120)
    assert r.returncode == 1
    assert r.stderr.strip().splitlines() == [r.stderr.strip()]
    assert "--max-seq-len 16" in r.stderr


def test_truncated_model_file(demo_gguf, tmp_path):
    cut = tmp_path / "cut.gguf"
    with open(demo_gguf, "rb") as f:
        cut.write_bytes(f.read(5_000_000))
    r = run_cli("--model-path", cut, "--prompt", "x", timeout=120)
    assert r.returncode == 1, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and str(cut) in r.stderr


def shm_segments():
    return sorted(n for n in os.listdir("/dev/shm") if n.startswith("shardllama"))


def test_workers_give_the_reference_text_and_leave_no_segment(demo_gguf):
    # --dtype gguf, not auto (f16 on a CPU without AVX-512, whose f16 activations may break a near-tie one
    # way on one process and the other on two): the file's own numbers, summed in f32, on every CPU.
    common = ["--model-path", demo_gguf, "--prompt", "The meaning of life is", "--temperature", "0",
              "--max-new-tokens", "16", "--dtype", "gguf", "-q"]
    reference = run_cli(*common, "--workers", 0)
    assert reference.returncode == 0, reference.stderr
    proc = subprocess.Popen([sys.executable, "-m", "shardllama", *map(str, common), "--workers", "2"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, stdin=subprocess.DEVNULL)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err
    assert out == reference.stdout
    # Its private segments carry its pid (segment.run_tag); other runs' segments may come and go meanwhile.
    assert not [n for n in shm_segments() if f"-{proc.pid}-" in n]


def test_keep_shards_then_list_and_clean(demo_gguf):
    """Only this test's own kept set is looked at and removed: other runs may keep sets of their own."""
    from shardllama.shm import shard_key

    key = shard_key(demo_gguf, torch.float32, 2)
    common = ["--model-path", demo_gguf, "--prompt", "Hi", "--max-new-tokens", "2", "--workers", "2",
              "--keep-shards", "--dtype", "f32", "-q"]
    r = run_cli(*common)
    assert r.returncode == 0, r.stderr
    try:
        kept = {n for n in shm_segments() if n.startswith(f"shardllama-{key}-") and n.count("-") == 2}
        assert kept
        listed = run_cli("shards", "list")
        assert listed.returncode == 0
        # One kept set of this key; a private set of the same model, dtype and N (another run's, or the previous
        # test's while its resource tracker is still unlinking it) may be listed beside it.
        [line] = [x for x in listed.stdout.splitlines() if x.startswith(key) and "  kept  " in x]
        assert "f32  2 workers" in line and str(demo_gguf) in line  # --dtype's name
        # The second run attaches to the kept shards rather than writing them again.
        again = run_cli(*common)
        assert again.returncode == 0, again.stderr
        assert {n for n in shm_segments() if n.startswith(f"shardllama-{key}-") and n.count("-") == 2} == kept
    finally:
        cleaned = run_cli("shards", "clean", "--key", key)
    assert cleaned.returncode == 0 and "removed" in cleaned.stdout
    assert not [n for n in shm_segments() if n.startswith(f"shardllama-{key}-")]
    assert key not in run_cli("shards", "list").stdout


def test_too_many_workers_is_a_usage_error(demo_gguf):
    r = run_cli("--model-path", demo_gguf, "--prompt", "x", "--workers", "10", timeout=120)
    assert r.returncode == 2, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and "10" in r.stderr


@pytest.mark.parametrize("sig, code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_interrupt_stops_workers_and_removes_shards(demo_gguf, sig, code):
    proc = subprocess.Popen([sys.executable, "-m", "shardllama", "--model-path", str(demo_gguf), "--prompt", "Once",
                             "--workers", "2", "--max-new-tokens", "400", "--ignore-eos"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL)
    try:
        proc.stdout.read(8)  # generation is under way
        workers = [p for p in psutil.Process(proc.pid).children() if "workers" in " ".join(p.cmdline())]
        assert len(workers) == 2
        proc.send_signal(sig)
        assert proc.wait(timeout=20) == code
    finally:
        proc.kill()
        proc.wait()
    _, still_running = psutil.wait_procs(workers, timeout=10)
    assert not still_running
    assert not [n for n in shm_segments() if f"-{proc.pid}-" in n]
    stderr = proc.stderr.read().decode()
    assert "leaked" not in stderr and "Traceback" not in stderr


# ---- checkpoint errors through the command, and a tiny model on tcp workers ------------------------


def _bad_checkpoint(kind, tmp_path):
    """A small checkpoint in a real format with one thing wrong; returns (path, text the error must name)."""
    import numpy as np

    from tests.test_loading import ARGS, Q, write_gguf, write_hf
    from shardllama.model import random_weights

    weights = random_weights(ARGS)
    if kind == "shape mismatch":
        weights["layers.1.attention.wk.weight"] = torch.randn(24, 64)
        return write_gguf(tmp_path / "m.gguf", weights), "blk.1.attn_k.weight"
    if kind == "unknown tensor":
        d = write_hf(tmp_path, weights, extra={"model.layers.0.self_attn.q_proj.bias": torch.zeros(64)})
        return d, "model.layers.0.self_attn.q_proj.bias"
    if kind == "unsupported quant type":  # Q8_1: gguf cannot dequantize it; 96 values per row = 3 blocks of 40 bytes
        del weights["layers.1.feed_forward.w2.weight"]
        weights["blk.1.ffn_down.weight"] = np.zeros((ARGS.dim, 3 * 40), np.uint8)
        return write_gguf(tmp_path / "m.gguf", weights, ARGS, Q.F16, types={"blk.1.ffn_down.weight": Q.Q8_1}), "Q8_1"
    if kind == "unsupported architecture":
        return write_gguf(tmp_path / "m.gguf", weights, arch="qwen2"), "qwen2"
    raise AssertionError(kind)


@pytest.mark.parametrize("kind", ["shape mismatch", "unknown tensor", "unsupported quant type", "unsupported architecture"])
def test_checkpoint_errors_exit_1_with_one_line(kind, tmp_path):
    path, fragment = _bad_checkpoint(kind, tmp_path)
    r = run_cli("--model-path", path, "--prompt", "tok1 tok2", timeout=120)
    assert r.returncode == 1, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("shardllama: error:") and fragment in lines[0], r.stderr


def test_listen_with_remote_workers_gives_the_ipc_tokens(tmp_path):
    """`shardllama --listen tcp://...` and two `shardllama worker --connect` processes that load their own
    slices from the model file: the same greedy text as local ipc workers.  CurveZMQ is on by default: one
    `shardllama keys` makes the keypair that both ends (sharing the config directory) use."""
    import socket

    from tests.test_loading import ARGS, write_gguf
    from shardllama.model import random_weights

    model = write_gguf(tmp_path / "tiny.gguf", random_weights(ARGS, seed=5))
    common = ["--model-path", model, "--prompt", "tok1 tok2 tok3", "--temperature", "0", "--max-new-tokens", "12",
              "--ignore-eos", "-q", "--workers", "2"]
    local = run_cli(*common, timeout=120)
    assert local.returncode == 0, local.stderr

    env = {**os.environ, "XDG_CONFIG_HOME": str(tmp_path / "config")}
    keys = run_cli("keys", env=env, timeout=60)
    assert keys.returncode == 0 and len(keys.stdout.strip()) == 40, keys.stderr
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    endpoint = f"tcp://127.0.0.1:{port}"
    coordinator = subprocess.Popen([sys.executable, "-m", "shardllama", *map(str, common), "--listen", endpoint],
                                   stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, stdin=subprocess.DEVNULL,
                                   env=env)
    workers = [subprocess.Popen([sys.executable, "-m", "shardllama", "worker", "--connect", endpoint, "--model-path",
                                 str(model)], stdin=subprocess.DEVNULL, env=env) for _ in range(2)]
    try:
        out, err = coordinator.communicate(timeout=120)
        assert coordinator.returncode == 0, err
        assert out == local.stdout
        for w in workers:  # the coordinator's close() tells remote workers to stop
            assert w.wait(timeout=20) == 0
    finally:
        for p in [coordinator, *workers]:
            p.kill()
            p.wait()


def test_listen_without_keys_or_with_a_bad_one_is_one_line(tmp_path):
    """No keys, or a secret others can read: one line naming the fix, from the coordinator and the worker."""
    env = {"XDG_CONFIG_HOME": str(tmp_path / "config")}
    from tests.test_loading import ARGS, write_gguf
    from shardllama.model import random_weights

    model = write_gguf(tmp_path / "tiny.gguf", random_weights(ARGS, seed=5))
    r = run_cli("--workers", "1", "--listen", "tcp://127.0.0.1:0", "--prompt", "x", "--model-path", model, env=env,
                timeout=60)
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 1 and len(lines) == 1 and "no CurveZMQ keys in" in lines[0] and "shardllama keys" in lines[0], r.stderr
    assert run_cli("keys", env=env, timeout=60).returncode == 0
    (tmp_path / "config" / "shardllama" / "shardllama.key_secret").chmod(0o644)
    r = run_cli("--workers", "1", "--listen", "tcp://127.0.0.1:0", "--prompt", "x", "--model-path", model, env=env,
                timeout=60)
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 1 and len(lines) == 1 and "others can read it (mode 644)" in lines[0], r.stderr
    w = run_cli("worker", "--connect", "tcp://127.0.0.1:1", "--model-path", model, env=env, timeout=60)
    assert w.returncode == 1 and w.stderr.strip().splitlines() == [lines[0]], w.stderr


# ---- start-up timing ---------------------------------------------------------------------------------


def _startup(stderr: str) -> tuple[float, dict[str, float]]:
    """The timing line's start-up figure and the -v phase lines (name -> seconds)."""
    total = float(re.search(r"start-up to first token: ([\d.]+) s", stderr)[1])
    return total, {name: float(s) for name, s in re.findall(r"^start-up: (.+?) +([\d.]+) s", stderr, re.M)}


@pytest.mark.parametrize("workers", [2, 0])
def test_verbose_says_where_the_start_up_went(tmp_path, workers):
    from tests.test_loading import ARGS, write_gguf
    from shardllama.model import random_weights

    model = write_gguf(tmp_path / "tiny.gguf", random_weights(ARGS, seed=5))
    r = run_cli("--model-path", model, "--prompt", "tok1 tok2 tok3", "--temperature", "0", "--max-new-tokens", "3",
                "--ignore-eos", "--workers", workers, "--dtype", "int8", "-v", timeout=120)
    assert r.returncode == 0, r.stderr
    total, phases = _startup(r.stderr)
    assert 0 < total < 120
    assert phases.pop("total to the first token") == total
    assert all(s >= 0 for s in phases.values())
    assert sum(phases.values()) <= total + 0.005 * len(phases)  # disjoint stretches (each rounded to 0.01 s)
    assert 0 < phases["python and imports"] < total and 0 <= phases["prefill and first token"] < total
    expected = {"python and imports", "model header and tokenizer", "tokenize the prompt", "prefill and first token",
                "other"}
    if workers:
        expected |= {"start worker processes", "lay out shards", "read checkpoint", "convert weights", "write shards",
                     "workers ready"}
        # The workers' own start beside the coordinator's phases: forked after its imports, they import nothing.
        own = re.search(r"workers ready .*\(slowest worker's own: python and imports ([\d.]+) s, (?:select device [\d.]+ s, )?kernel library "
                        r"[\d.]+ s, map shard [\d.]+ s", r.stderr)
        assert own, r.stderr
    else:
        expected |= {"read and convert weights"}
    assert set(phases) == expected, r.stderr


def test_start_up_is_on_the_timing_line_and_verbose_excludes_quiet(tmp_path):
    from tests.test_loading import ARGS, write_gguf
    from shardllama.model import random_weights

    model = write_gguf(tmp_path / "tiny.gguf", random_weights(ARGS, seed=5))
    r = run_cli("--model-path", model, "--prompt", "tok1 tok2", "--max-new-tokens", "2", "--workers", "1", timeout=120)
    assert r.returncode == 0, r.stderr
    [line] = [x for x in r.stderr.splitlines() if x.startswith("prompt:")]
    assert re.search(r"time to first token: [\d.]+ ms; start-up to first token: [\d.]+ s; generated: ", line), line
    assert "start-up: " not in r.stderr  # the phases only with -v
    both = run_cli("--model-path", model, "--prompt", "x", "-q", "-v", timeout=60)
    assert both.returncode == 2 and "-v" in both.stderr and len(both.stderr.strip().splitlines()) == 1, both.stderr


def test_workers_are_forked_from_the_command(tmp_path):
    """After its imports the command forks its workers (shardllama.launch): children with its own command
    line, not `python -m workers`; they stop with it and leave no shared memory."""
    from tests.test_loading import ARGS, write_gguf
    from shardllama.model import random_weights

    model = write_gguf(tmp_path / "tiny.gguf", random_weights(ARGS, seed=5))
    proc = subprocess.Popen([sys.executable, "-m", "shardllama", "--model-path", str(model), "--prompt", "tok1",
                             "--workers", "2", "--max-new-tokens", "100000", "--ignore-eos", "--max-seq-len", "4096"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL)
    try:
        proc.stdout.read(8)  # generation is under way
        parent = psutil.Process(proc.pid)
        children = [p for p in parent.children() if "resource_tracker" not in " ".join(p.cmdline())]
        assert len(children) == 2 and all(p.cmdline() == parent.cmdline() for p in children), \
            [p.cmdline() for p in children]
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=20) == 130
    finally:
        proc.kill()
        proc.wait()
    _, still_running = psutil.wait_procs(children, timeout=10)
    assert not still_running
    assert not [n for n in shm_segments() if f"-{proc.pid}-" in n]
