"""tools/bench_llamacpp.py without llama.cpp: the bytes a decode step reads, the disturbed-sample filter and
the table (the timing itself needs llama-cpp-python and is run by hand, never by the tests)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

TOOLS = Path(__file__).resolve().parents[1] / "tools"


def _load(name: str):
    spec = importlib.util.spec_from_file_location(name, TOOLS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


make_gguf = _load("make_gguf")
bench = _load("bench_llamacpp")


@pytest.mark.parametrize("tied", [False, True])
def test_decode_reads_every_tensor_but_the_embeddings_unless_tied(tmp_path, tied):
    import gguf

    args = make_gguf.random_args("tiny", n_layers=1, vocab_size=400, tie_embeddings=tied)
    path = make_gguf.write_random(tmp_path / "m.gguf", args, "f16", progress=False)
    sizes = {t.name: int(t.n_bytes) for t in gguf.GGUFReader(path).tensors}
    step, total = bench.decode_bytes(path)
    assert total == sum(sizes.values())
    assert step == (total if tied else total - sizes["token_embd.weight"])
    assert ("output.weight" in sizes) != tied


def test_disturbed_samples_are_left_out_unless_all_are():
    assert bench.clean([(1.0, 0.0), (9.0, 0.5), (2.0, 0.05)]) == ([1.0, 2.0], 1)
    assert bench.clean([(9.0, 0.5), (8.0, 0.9)]) == ([9.0, 8.0], 2)


def test_table_has_ratios_speed_up_and_the_check():
    def row(engine, n, decode, prefill, top1=7):
        return dict(engine=engine, label=f"{engine} {n}", threads=n if engine == "llama.cpp" else None,
                    workers=n if engine == "shardllama" else None, decode_ms=decode, decode_ms_min=decode,
                    decode_ms_max=decode, gb_s=1.0, prefill_tok_s={"64": prefill, "128": prefill},
                    peak_memory_gb=1.0, load_s=1.0, top5=[top1, 1, 2, 3, 4], disturbed=0, samples_total=3)

    result = dict(date="2026-01-01", machine=dict(cpu="CPU", cpu_family="1", cpu_model="2", flags="avx2", cpus=2,
                                                   mem_gib=24),
                  versions=dict(torch="t", llama_cpp_python="l", shardllama="s", shardllama_commit="c"),
                  models=[dict(model="m", file_gb=1.0, wall_s=60, settings=dict(
                      rounds=1, repeat=3, prompt_lens=[64, 128], decode_tokens=32, decode_after=8),
                      rows=[row("llama.cpp", 2, 10.0, 100.0), row("shardllama", 1, 40.0, 20.0),
                            row("shardllama", 2, 20.0, 40.0, top1=8)])])
    md = bench.markdown(result)
    assert "| m (1.00 GB) | shardllama 2 | 20.0 (20.0–20.0) | 1.0 | 0.50× | 40.0 | 40.0 | 0.40× | 1.00 | 1.0 |" in md
    assert "m: 2 workers over 1: decode 2.00×, prefill 128 2.00×" in md
    assert "shardllama 1 5/5, same top-1" in md and "shardllama 2 4/5, top-1 8" in md


def test_start_up_columns_and_their_medians():
    assert bench.median_of([{"startup_s": 3.0}, {"startup_s": 1.0}, {"startup_s": 2.0}], "startup_s") == 2.0
    assert bench.median_of([{"startup_s": 3.0}, {"startup_kept_s": None}, {}], "startup_kept_s") is None
    assert bench.median_of([{"startup_kept_s": 1.5}, {"startup_kept_s": None}], "startup_kept_s") == 1.5

    def row(engine, startup, kept=None):
        return dict(engine=engine, label=engine, threads=2 if engine == "llama.cpp" else None,
                    workers=2 if engine == "shardllama" else None, decode_ms=10.0, decode_ms_min=10.0,
                    decode_ms_max=10.0, gb_s=1.0, prefill_tok_s={"64": 100.0}, peak_memory_gb=1.0, load_s=0.5,
                    top5=[7, 1, 2, 3, 4], disturbed=0, samples_total=2, startup_s=startup, startup_kept_s=kept)

    result = dict(date="2026-01-01", machine=dict(cpu="CPU", cpu_family="1", cpu_model="2", flags="", cpus=2, mem_gib=24),
                  versions=dict(torch="t", llama_cpp_python="l", shardllama="s", shardllama_commit="c"),
                  models=[dict(model="m", file_gb=1.0, wall_s=60, settings=dict(
                      rounds=1, repeat=1, prompt_lens=[64], decode_tokens=8, decode_after=8),
                      rows=[row("llama.cpp", 0.61), row("shardllama", 2.5, 1.75)])])
    md = bench.markdown(result)
    assert "| load s | start-up s | start-up kept s |" in md
    assert "| llama.cpp | 10.0 (10.0–10.0) | 1.0 | 1.00× | 100.0 | 1.00× | 1.00 | 0.5 | 0.61 |  |" in md
    assert "| shardllama | 10.0 (10.0–10.0) | 1.0 | 1.00× | 100.0 | 1.00× | 1.00 | 0.5 | 2.50 | 1.75 |" in md
    del result["models"][0]["rows"][1]["startup_s"]  # results of a run before these columns
    assert "| shardllama | 10.0 (10.0–10.0) | 1.0 | 1.00× | 100.0 | 1.00× | 1.00 | 0.5 |  | 1.75 |" in bench.markdown(result)
