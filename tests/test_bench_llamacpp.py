"""tools/bench_llamacpp.py without llama.cpp: the bytes a decode step reads, the disturbed-sample filter, the
configurations, the rows and the table (the timing itself needs llama-cpp-python and is run by hand, never
by the tests)."""

from __future__ import annotations

import argparse

import pytest

from tests.helpers import load_tool

make_gguf = load_tool("make_gguf")
bench = load_tool("bench_llamacpp")


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
        unit = "thread" if engine == "llama.cpp" else "worker"
        return dict(engine=engine, label=f"{engine}, {n} {unit}{'s' * (n > 1)}", threads=n if engine == "llama.cpp" else None,
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
    assert ("| m (1.00 GB) | shardllama, 2 workers |  | 20.0 (20.0–20.0) | 1.0 | 0.50× | 40.0 | 40.0 | 0.40× "
            "|  | 1.00 | 1.0 |") in md
    assert "m: 2 workers over 1: decode 2.00×, prefill 128 2.00×" in md
    assert "shardllama, 1 worker 5/5, same top-1" in md and "shardllama, 2 workers 4/5, top-1 8" in md


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
    assert "| llama.cpp | file | 10.0 (10.0–10.0) | 1.0 | 1.00× | 100.0 | 1.00× |  | 1.00 | 0.5 | 0.61 |  |" in md
    assert "| shardllama |  | 10.0 (10.0–10.0) | 1.0 | 1.00× | 100.0 | 1.00× |  | 1.00 | 0.5 | 2.50 | 1.75 |" in md
    del result["models"][0]["rows"][1]["startup_s"]  # results of a run before these columns
    assert "| shardllama |  | 10.0 (10.0–10.0) | 1.0 | 1.00× | 100.0 | 1.00× |  | 1.00 | 0.5 |  | 1.75 |" in bench.markdown(result)


def _args(**kw) -> argparse.Namespace:
    base = dict(dtypes=["auto"], prefill_precisions=["f32"], workers=[2], int8_workers=[], llama_threads=[2],
                baseline=None)
    return argparse.Namespace(**{**base, **kw})


def test_configurations_per_dtype_with_the_cli_default_unnamed():
    labels = [c["label"] for c in bench.configs(_args(dtypes=["auto", "int8"], workers=[1, 2]))]
    assert labels == ["llama.cpp, 2 threads", "shardllama, 1 worker", "shardllama, 2 workers",
                      "shardllama int8, 1 worker", "shardllama int8, 2 workers"]
    dtypes = {c["label"]: c.get("dtype") for c in bench.configs(_args(dtypes=["auto", "int8"]))}
    assert dtypes == {"llama.cpp, 2 threads": None, "shardllama, 2 workers": "auto", "shardllama int8, 2 workers": "int8"}
    # --int8-workers (older command lines) adds the int8 rows --dtypes does not already have
    labels = [c["label"] for c in bench.configs(_args(dtypes=["auto", "int8"], int8_workers=[1, 2]))]
    assert labels.count("shardllama int8, 2 workers") == 1 and "shardllama int8, 1 worker" in labels


def _run(decode_ms, foreign=0.0, **extra):
    return dict(decode_ms=decode_ms, decode_foreign=[foreign] * len(decode_ms), prefill_tok_s={"64": [100.0]},
                prefill_foreign={"64": [0.0]}, memory_gb=1.5, load_s=2.0, top5=[1, 2, 3, 4, 5], startup_s=3.0,
                **extra)


def test_a_row_counts_the_workers_segments_against_the_files_bytes_not_the_embedding():
    c = dict(engine="shardllama", workers=2, dtype="auto", label="shardllama, 2 workers")
    shm = {"emb": 400_000_000, "r0": 560_000_000, "r1": 540_000_000}
    runs = [_run([20.0, 22.0], shm_bytes=shm, dtype="gguf"), dict(error="exit code 1: boom")]
    row = bench.summary(c, runs, step_bytes=1_000_000_000, prompt_lens=[64])
    assert row["shm_weights_gb"] == pytest.approx(1.1) and row["shm_embedding_gb"] == pytest.approx(0.4)
    assert row["shm_ratio"] == pytest.approx(1.1)
    assert row["gb_s"] == pytest.approx(1.1 / 0.021)  # what the workers read per step / the median decode time
    assert row["dtype"] == "gguf" and row["dtype_asked"] == "auto" and row["errors"] == ["exit code 1: boom"]
    assert row["peak_memory_gb"] == 1.5 and row["prefill_tok_s"] == {"64": 100.0}

    llama = bench.summary(dict(engine="llama.cpp", threads=2, label="llama.cpp, 2 threads"), [_run([20.0])],
                          step_bytes=1_000_000_000, prompt_lens=[64])
    assert "shm_ratio" not in llama and llama["gb_s"] == pytest.approx(1.0 / 0.020)


def test_quantized_rows_show_their_weights_shared_memory_and_the_llama_cpp_build():
    import bench_report

    system = ("CPU : SSE3 = 1 | SSSE3 = 1 | AVX = 1 | AVX_VNNI = 1 | AVX2 = 1 | F16C = 1 | FMA = 1 | BMI2 = 1 | "
              "AVX512 = 1 | AVX512_VBMI = 1 | AVX512_VNNI = 1 | AVX512_BF16 = 1 | LLAMAFILE = 1 | OPENMP = 1 |")
    build = bench_report.llama_build(system, "avx2 avx512f avx512vbmi avx512_vnni avx_vnni avx512_bf16 amx_int8 f16c fma")
    assert build["amx"] is False and build["unused"] == ["AMX_INT8"] and "AVX512_VNNI" in build["features"]
    portable = bench_report.llama_build(system.replace("AVX_VNNI = 1", "AVX_VNNI = 0"), "avx2 avx_vnni avx512f")
    assert portable["unused"] == ["AVX_VNNI"]

    def row(engine, **kw):
        return dict(engine=engine, label=engine, threads=2, workers=2, decode_ms=10.0, decode_ms_min=10.0,
                    decode_ms_max=10.0, gb_s=1.0, prefill_tok_s={"64": 100.0}, peak_memory_gb=1.0, load_s=0.5,
                    top5=[7, 1, 2, 3, 4], disturbed=0, samples_total=2, **kw)

    result = dict(date="2026-01-01", machine=dict(cpu="CPU", cpu_family="1", cpu_model="2", flags="", cpus=2, mem_gib=24),
                  versions=dict(torch="t", llama_cpp_python="0.3.36", shardllama="s", shardllama_commit="c",
                                llama_cpp_build=build),
                  models=[dict(model="7b-q4_k_m", file_gb=4.08, wall_s=60, decode_bytes_per_token=3_800_000_000,
                               tensor_types={"Q4_K": 193, "F32": 65, "Q6_K": 33},
                               settings=dict(rounds=1, repeat=1, prompt_lens=[64], decode_tokens=8, decode_after=8),
                               rows=[row("llama.cpp"),
                                     row("shardllama", dtype="gguf", shm_weights_gb=3.9, shm_embedding_gb=0.52,
                                         shm_ratio=1.0263)])])
    md = bench.markdown(result)
    assert ("llama.cpp timed: llama-cpp-python 0.3.36, ggml CPU backend compiled for AVX AVX_VNNI AVX2 F16C FMA "
            "AVX512 AVX512_VBMI AVX512_VNNI AVX512_BF16, no AMX (this CPU also has AMX_INT8).") in md
    assert "| 7b-q4_k_m (4.08 GB) | shardllama | gguf | 10.0 (10.0–10.0) | 1.0 | 1.00× | 100.0 | 1.00× | 3.90 (1.03×) | 1.00 |" in md
    assert "| 7b-q4_k_m (4.08 GB) | llama.cpp | file | 10.0 (10.0–10.0) | 1.0 | 1.00× | 100.0 | 1.00× |  | 1.00 |" in md
    assert "7b-q4_k_m: tensors Q4_K 193, F32 65, Q6_K 33" in md
    assert ("shardllama (gguf weights): shared memory 4.42 GB = the workers' weights 3.90 GB, 1.03× the file's "
            "3.80 GB of those tensors (target ≤ 1.15×), + the coordinator's embedding table 0.52 GB") in md


def test_tensor_types_of_a_file(tmp_path):
    args = make_gguf.random_args("tiny", n_layers=1, vocab_size=400)
    path = make_gguf.write_random(tmp_path / "m.gguf", args, "f16", progress=False)
    types = bench.tensor_types(path)
    assert types == {"F16": 9, "F32": 3}  # 7 matrices, embedding and head; 2 norms per layer + the final one
