"""What tools/bench_llamacpp.py ran on (machine, versions, which llama.cpp build) and its markdown table."""

from __future__ import annotations

import os
import platform
import re
import subprocess
from pathlib import Path

from bench_timing import DISTURBED

ROOT = Path(__file__).resolve().parents[1]

# /proc/cpuinfo flags worth recording: what the CPU offers the two engines' kernels.
CPU_FLAGS = ("avx2", "avx512f", "avx512vbmi", "avx512_vnni", "avx_vnni", "avx512_bf16", "avx512_fp16",
             "amx_tile", "amx_int8", "f16c", "fma")
# ggml's names for its compile-time CPU features (llama_print_system_info) -> the /proc/cpuinfo flag.
GGML_FEATURES = {"AVX": "avx", "AVX2": "avx2", "F16C": "f16c", "FMA": "fma", "AVX_VNNI": "avx_vnni",
                 "AVX512": "avx512f", "AVX512_VBMI": "avx512vbmi", "AVX512_VNNI": "avx512_vnni",
                 "AVX512_BF16": "avx512_bf16", "AMX_INT8": "amx_int8"}


def machine() -> dict:
    info: dict[str, str] = {}
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        key, _, value = line.partition(":")
        key = key.strip()
        if key in ("model name", "cpu family", "model", "stepping") and key not in info:
            info[key] = value.strip()
        if key == "flags" and "flags" not in info:
            info["flags"] = " ".join(f for f in value.split() if f in CPU_FLAGS)
    mem = next(line for line in Path("/proc/meminfo").read_text().splitlines() if line.startswith("MemTotal"))
    return dict(cpu=info.get("model name", platform.processor()), cpu_family=info.get("cpu family"),
                cpu_model=info.get("model"), flags=info.get("flags", ""), cpus=len(os.sched_getaffinity(0)),
                mem_gib=round(int(mem.split()[1]) / 2**20, 1), kernel=platform.release())


def llama_build(system_info: str, cpu_flags: str) -> dict:
    """Which llama.cpp build is timed, from what it says of itself: ``llama_print_system_info`` lists the CPU
    features ggml was compiled for (``AVX512 = 1``: compile-time, not what the CPU has), so a native build
    and a portable one differ here.  ``unused``: features this CPU has that the build leaves out; ``amx``:
    whether its AMX path (the one that crashed on quantized files on the Intel kind) is in."""
    features = re.findall(r"(\w+) = 1", system_info)
    cpu = set(cpu_flags.split())
    unused = [f for f, flag in GGML_FEATURES.items() if flag in cpu and f not in features]
    return dict(features=features, unused=unused, amx="AMX_INT8" in features)


def describe_build(v: dict) -> str:
    """One line for the table's header: llama-cpp-python's version and its ggml CPU build."""
    b = v.get("llama_cpp_build")
    if not b:
        return f"llama-cpp-python {v['llama_cpp_python']}"
    simd = [f for f in b["features"] if f in GGML_FEATURES]
    return (f"llama-cpp-python {v['llama_cpp_python']}, ggml CPU backend compiled for {' '.join(simd)}"
            + ("" if b["amx"] else ", no AMX")
            + (f" (this CPU also has {' '.join(b['unused'])})" if b["unused"] else " (all this CPU has)"))


def versions(cpu_flags: str) -> dict:
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

    system = llama_cpp.llama_print_system_info().decode().strip()
    return dict(torch=torch.__version__, llama_cpp_python=llama_cpp.__version__, shardllama=version("shardllama"),
                shardllama_commit=commit, python=platform.python_version(), llama_cpp_system=system,
                llama_cpp_build=llama_build(system, cpu_flags))


# ---- the table ------------------------------------------------------------------------------------------


def plain(r: dict) -> bool:
    """shardllama with the default --dtype (auto) and f32 prefill, from this checkout."""
    return r["engine"] == "shardllama" and r["label"].startswith("shardllama,")


def shm_cell(r: dict) -> str:
    """The weights in shared memory (the workers' segments) and their ratio to the file's bytes of the same
    tensors; blank for llama.cpp, which maps the file."""
    if r.get("shm_weights_gb") is None:
        return ""
    return f"{r['shm_weights_gb']:.2f} ({r['shm_ratio']:.2f}×)"


def model_notes(mod: dict, ok: list[dict], ref: dict | None) -> list[str]:
    s = mod["settings"]
    last = str(s["prompt_lens"][-1])
    notes = []
    if mod.get("tensor_types"):
        notes.append(f"{mod['model']}: tensors " + ", ".join(f"{t} {n}" for t, n in mod["tensor_types"].items()))
    one = next((r for r in ok if plain(r) and r["workers"] == 1), None)
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
    for r in ok:
        if r.get("shm_weights_gb") is not None:
            notes.append(f"{mod['model']}: {r['label']} ({r.get('dtype')} weights): shared memory "
                         f"{r['shm_weights_gb'] + r['shm_embedding_gb']:.2f} GB = the workers' weights "
                         f"{r['shm_weights_gb']:.2f} GB, {r['shm_ratio']:.2f}× the file's "
                         f"{mod['decode_bytes_per_token'] / 1e9:.2f} GB of those tensors (target ≤ 1.15×), + the "
                         f"coordinator's embedding table {r['shm_embedding_gb']:.2f} GB")
    if ref is not None:
        same = [f"{r['label']} {len(set(r['top5']) & set(ref['top5']))}/5"
                + (", same top-1" if r["top5"][0] == ref["top5"][0] else f", top-1 {r['top5'][0]}")
                for r in ok if r is not ref]
        notes.append(f"{mod['model']}: five likeliest next tokens after the decode run, shared with "
                     f"{ref['label']} (top-1 {ref['top5'][0]}): {'; '.join(same)}")
    disturbed = ", ".join(f"{r['label']} {r['disturbed']}/{r['samples_total']}" for r in ok if r["disturbed"])
    notes.append(f"{mod['model']}: median of {s['rounds'] * s['repeat']} ({s['rounds']} rounds × {s['repeat']}), "
                 f"decode {s['decode_tokens']} tokens after {s['decode_after']}; {mod['wall_s'] / 60:.1f} min"
                 + (f"; samples during which other processes took > {DISTURBED} core, left out: {disturbed}"
                    if disturbed else ""))
    return notes


def markdown(result: dict) -> str:
    m, v = result["machine"], result["versions"]
    lines = [
        f"shardllama vs llama.cpp, {result['date']}: {m['cpu']} (family {m['cpu_family']} model {m['cpu_model']}; "
        f"{m['flags']}), {m['cpus']} CPUs, {m['mem_gib']} GiB; torch {v['torch']}, shardllama {v['shardllama']} "
        f"({v['shardllama_commit']}).",
        "",
        f"llama.cpp timed: {describe_build(v)}.",
        "",
    ]
    lens = sorted({n for mod in result["models"] for n in mod["settings"]["prompt_lens"]})
    head = (["model", "engine", "weights", "decode ms/token (min–max)", "GB/s", "decode vs llama.cpp"]
            + [f"prefill {n} tok/s" for n in lens]
            + [f"prefill {lens[-1]} vs llama.cpp", "shm weights GB (× file)",
               "peak memory GB (llama.cpp RSS, ours PSS of all processes)", "load s", "start-up s", "start-up kept s"])
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    notes = []
    for mod in result["models"]:
        ok = [r for r in mod["rows"] if "decode_ms" in r]
        ref = max((r for r in ok if r["engine"] == "llama.cpp"), key=lambda r: r["threads"], default=None)
        last = str(mod["settings"]["prompt_lens"][-1])
        label = f"{mod['model']} ({mod['file_gb']:.2f} GB)"
        for r in mod["rows"]:
            if "decode_ms" not in r:
                lines.append(f"| {label} | {r['label']} | failed: {'; '.join(r['errors'])} |")
                continue
            weights = "file" if r["engine"] == "llama.cpp" else r.get("dtype", "")
            cells = [label, r["label"], weights,
                     f"{r['decode_ms']:.1f} ({r['decode_ms_min']:.1f}–{r['decode_ms_max']:.1f})", f"{r['gb_s']:.1f}"]
            cells.append(f"{ref['decode_ms'] / r['decode_ms']:.2f}×" if ref else "")
            cells += [f"{r['prefill_tok_s'][str(n)]:.1f}" if str(n) in r["prefill_tok_s"] else "" for n in lens]
            cells.append(f"{r['prefill_tok_s'][last] / ref['prefill_tok_s'][last]:.2f}×" if ref else "")
            cells += [shm_cell(r), f"{r['peak_memory_gb']:.2f}", f"{r['load_s']:.1f}"]
            cells += [f"{r[k]:.2f}" if r.get(k) is not None else "" for k in ("startup_s", "startup_kept_s")]
            lines.append("| " + " | ".join(cells) + " |")
        notes += model_notes(mod, ok, ref)
    lines += [""] + [f"- {n}" for n in notes]
    return "\n".join(lines) + "\n"
