"""Constrained decoding libraries on the demo model's vocabulary: what a JSON schema costs per token and per
request.  The measurement that chose llguidance for ``shardllama.grammar`` (xgrammar is timed only when
installed: ``pip install -e '.[bench]'``).

    python tools/bench_grammar.py                 # markdown table on stdout
    python tools/bench_grammar.py --out tools/results/bench-grammar.md

For each library: the import (a fresh interpreter), building its tokenizer object from the vocabulary's
bytes (once per model), compiling each schema (once per request; caches off, median of ``--repeats``), and
the per-token mask: a valid JSON document of each schema is walked token by token, and at each position the
library fills the allowed-token bitmask (median and 90th percentile over all positions of all walks), then
accepts the token.  One thread each; the numbers are wall-clock on whatever else the machine is doing.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.metadata
import json
import platform
import statistics
import subprocess
import sys
import time

import torch

from shardllama.demo import demo_model_path
from shardllama.loading import open_checkpoint
from shardllama.tokenizer_files import load_tokenizer

PERSON = {"type": "object", "properties": {
    "name": {"type": "string", "maxLength": 40}, "age": {"type": "integer", "minimum": 0},
    "email": {"type": "string"}, "pets": {"type": "array", "items": {"enum": ["cat", "dog", "fish"]}},
    "address": {"type": "object", "properties": {"city": {"type": "string"}, "zip": {"type": "string"}},
                "required": ["city"]}, "student": {"type": "boolean"}},
    "required": ["name", "age", "student"], "additionalProperties": False}
TOOL_CALL = {"anyOf": [
    {"type": "object", "properties": {"name": {"const": "get_weather"}, "arguments": {
        "type": "object", "properties": {"city": {"type": "string"}, "unit": {"enum": ["celsius", "fahrenheit"]}},
        "required": ["city", "unit"], "additionalProperties": False}}, "required": ["name", "arguments"],
     "additionalProperties": False},
    {"type": "object", "properties": {"name": {"const": "search"}, "arguments": {
        "type": "object", "properties": {"query": {"type": "string"}, "limit": {"type": "integer"}},
        "required": ["query"]}}, "required": ["name", "arguments"], "additionalProperties": False}]}
CASES = [  # (name, schema, a valid document written with ", " and ": ")
    ("any JSON object", {"type": "object"},
     {"id": 12345, "tags": ["alpha", "beta", "gamma"], "nested": {"x": 1.5, "y": None, "ok": True}, "text": "hello world"}),
    ("person (6 fields, nested)", PERSON,
     {"name": "Ada Lovelace", "age": 36, "email": "ada@example.org", "pets": ["cat", "dog"],
      "address": {"city": "London", "zip": "W1"}, "student": False}),
    ("tool call (2 tools)", TOOL_CALL, {"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius"}}),
]


def timed(fn, repeats: int) -> float:
    """Median seconds of ``fn()`` over ``repeats`` calls."""
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def import_s(module: str) -> float:
    code = f"import time; t = time.perf_counter(); import {module}; print(time.perf_counter() - t)"
    return float(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout)


def walk(start, mask, accept, tokens: list[int]) -> list[float]:
    """Mask times (s) at each position of ``tokens``, accepting each after its mask."""
    matcher = start()
    times = []
    for t in tokens:
        t0 = time.perf_counter()
        mask(matcher)
        times.append(time.perf_counter() - t0)
        assert accept(matcher, t), "the document is not valid under its schema"
    return times


def bench_llguidance(tokenizer, docs, repeats):
    import llguidance

    from shardllama import grammar

    row = {"library": f"llguidance {llguidance.__version__}", "import_s": import_s("llguidance")}
    t = time.perf_counter()
    grammar._compiled.pop(tokenizer, None)
    ll = grammar.compiled_tokenizer(tokenizer)
    row["tokenizer_s"] = time.perf_counter() - t
    bits = torch.zeros((tokenizer.vocab_size + 31) // 32, dtype=torch.int32)
    for name, schema, tokens in docs:
        source = llguidance.LLMatcher.grammar_from_json_schema(json.dumps(schema), overrides=grammar.JSON_OVERRIDES)
        row[f"compile {name}"] = timed(lambda: llguidance.LLMatcher(ll, source, log_level=0), repeats)
        times = []
        for _ in range(repeats):
            times += walk(lambda: llguidance.LLMatcher(ll, source, log_level=0),
                          lambda m: m.unsafe_compute_mask_ptr(bits.data_ptr(), bits.numel() * 4),
                          lambda m, t: m.consume_token(t), tokens)
        row[f"mask {name}"] = times
    return row


def bench_xgrammar(tokenizer, docs, repeats):
    try:
        import xgrammar as xgr
    except ImportError:
        return None
    row = {"library": f"xgrammar {importlib.metadata.version('xgrammar')}", "import_s": import_s("xgrammar")}
    t = time.perf_counter()
    info = xgr.TokenizerInfo([tokenizer.token_bytes(i) for i in range(tokenizer.vocab_size)], xgr.VocabType.RAW,
                             vocab_size=tokenizer.vocab_size, stop_token_ids=sorted(tokenizer.stop_ids))
    compiler = xgr.GrammarCompiler(info, max_threads=1, cache_enabled=False)
    row["tokenizer_s"] = time.perf_counter() - t
    bitmask = xgr.allocate_token_bitmask(1, tokenizer.vocab_size)
    for name, schema, tokens in docs:
        text = json.dumps(schema)

        def compile_():
            return compiler.compile_json_schema(text, any_whitespace=False, separators=(", ", ": "))

        row[f"compile {name}"] = timed(compile_, repeats)
        compiled = compile_()
        times = []
        for _ in range(repeats):
            times += walk(lambda: xgr.GrammarMatcher(compiled), lambda m: m.fill_next_token_bitmask(bitmask),
                          lambda m, t: m.accept_token(t), tokens)
        row[f"mask {name}"] = times
    return row


def cpu_model() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
        return next(line.split(":", 1)[1].strip() for line in out.splitlines() if line.startswith("Model name"))
    except (OSError, StopIteration):
        return platform.processor() or "unknown CPU"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="bench_grammar.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--repeats", type=int, default=20, help="compiles and walks per schema (default 20)")
    p.add_argument("--out", help="also write the markdown table to this file")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    path = demo_model_path(progress=False)
    with open_checkpoint(path) as ckpt:
        tokenizer = load_tokenizer(path, gguf_fields=ckpt.gguf_fields)
    docs = [(name, schema, tokenizer.encode(json.dumps(doc), bos=False, special=False))
            for name, schema, doc in CASES]
    rows = [r for r in (bench_llguidance(tokenizer, docs, args.repeats), bench_xgrammar(tokenizer, docs, args.repeats))
            if r is not None]
    lines = [f"# Constrained decoding on the demo vocabulary ({tokenizer.vocab_size} tokens)", "",
             f"{datetime.date.today().isoformat()}, {cpu_model()}, one thread, `python tools/bench_grammar.py "
             f"--repeats {args.repeats}` (medians; mask: median / 90th percentile over every position of "
             "every walk).", "",
             "| library | import | tokenizer build | " + " | ".join(
                 f"{name}: compile, mask µs" for name, _, _ in docs) + " |",
             "|---|---|---|" + "---|" * len(docs)]
    for r in rows:
        cells = []
        for name, _, tokens in docs:
            m = sorted(r[f"mask {name}"])
            cells.append(f"{1e3 * r[f'compile {name}']:.2f} ms, {1e6 * statistics.median(m):.1f} / "
                         f"{1e6 * m[int(0.9 * (len(m) - 1))]:.1f} µs")
        lines.append(f"| {r['library']} | {r['import_s']:.2f} s | {r['tokenizer_s']:.2f} s | " + " | ".join(cells) + " |")
    lines += ["", "Documents: " + "; ".join(f"{name}: {len(tokens)} tokens" for name, _, tokens in docs) + "."]
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
