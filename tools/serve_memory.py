"""Memory of `shardllama serve` after one short request: the sum of PSS over the server and its workers.

PSS (proportional set size) divides each shared page among the processes that map it, so the sum over a
process tree is what the tree costs the machine: weights in shared memory count once, a worker's KV cache
counts by the pages it has touched.  Usage::

    python3 tools/serve_memory.py                      # defaults: the demo model, as stored (int8)
    python3 tools/serve_memory.py --dtype f32 -- --workers 2

Arguments after ``--`` go to `shardllama serve` unchanged.  Prints one line per process and the total.
"""

from __future__ import annotations

import argparse
import json
import socket
import subprocess
import sys
import time
import urllib.request

import psutil


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_ready(port: int, proc: subprocess.Popen, timeout: float) -> None:
    """Until GET /health is 200 (the port is bound before the model loads: 503 meanwhile)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"serve exited with {proc.returncode} before it was ready")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5) as r:
                if r.status == 200:
                    return
        except OSError:  # not bound yet, or 503 (urllib's HTTPError is an OSError)
            pass
        time.sleep(0.2)
    raise SystemExit(f"serve was not ready on port {port} within {timeout:.0f} s")


def one_request(port: int, prompt: str, max_tokens: int) -> str:
    body = json.dumps({"model": "demo", "prompt": prompt, "max_tokens": max_tokens, "temperature": 0}).encode()
    req = urllib.request.Request(f"http://127.0.0.1:{port}/v1/completions", body,
                                 {"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=300) as r:
        return json.load(r)["choices"][0]["text"]


def tree_pss(pid: int) -> list[tuple[int, str, int]]:
    root = psutil.Process(pid)
    out = []
    for p in [root, *root.children(recursive=True)]:
        try:
            out.append((p.pid, " ".join(p.cmdline()[:3])[:60], p.memory_full_info().pss))
        except psutil.NoSuchProcess:
            pass
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--prompt", default="The meaning of life is")
    ap.add_argument("--max-tokens", type=int, default=16)
    ap.add_argument("--timeout", type=float, default=600)
    ap.add_argument("serve_args", nargs="*", help="passed to `shardllama serve` (after --)")
    a = ap.parse_args()
    port = free_port()
    cmd = [sys.executable, "-m", "shardllama", "serve", "-q", "--dtype", a.dtype,
           "--inference-server-port", str(port), *a.serve_args]
    proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL)
    try:
        wait_ready(port, proc, a.timeout)
        text = one_request(port, a.prompt, a.max_tokens)
        time.sleep(0.5)
        rows = tree_pss(proc.pid)
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
    for pid, cmdline, pss in rows:
        print(f"{pid:>8} {pss / 2**20:9.1f} MiB  {cmdline}")
    total = sum(r[2] for r in rows)
    print(f"total PSS {total / 1e9:.2f} GB ({len(rows)} processes), dtype {a.dtype}, "
          f"args {' '.join(a.serve_args) or '(defaults)'}; completion: {text!r}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
