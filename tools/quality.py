"""What lower precision costs in quality: perplexity per weight dtype and prefill precision, and agreement.

    python tools/quality.py                          # the demo model, f32 f16 bf16 int8
    python tools/quality.py --model-path M --dtypes f16 int8 --tokens 32
    python tools/quality.py --dtypes f32 f16 --prefill-precisions f32 bf16   # bf16 prefill against f32
    python tools/quality.py --model-path demo-q8_0 --baseline f32 --dtypes auto --min-top1 0.99 --decode-text
    python tools/quality.py --model-path demo-q4_k_m --baseline f32 --dtypes auto int8 --min-top1 0.97 --decode-text

A quantized GGUF against itself: ``--baseline f32`` is the file dequantized to f32 (gguf's dequantization,
as ``--dtype f32`` loads it), ``auto`` is what shardllama does with it by default (``--dtype auto``: its own
block types computed in place once shardllama has that, int8 before; the row says which), and ``int8``
requantizes it.  ``--model-path`` takes a file or a name from tools/bench_models.py (``demo-q8_0``,
``demo-q4_k_m``, ``7b-q4_0``...: llama.cpp's quantizer wrote them; made on first use, which needs the
``bench`` extra).  ``--min-top1`` makes the run a check: exit status 1 when a row's teacher-forced top-1
agreement with the baseline (text and, with ``--decode-text``, decode steps) is below it.

For every dtype the model is loaded as shardllama loads it (``load_weights``: int8 is quantized at load
time, ``auto`` resolved as the CLI resolves it) and run by the reference model in this process (the sharded engine computes the same numbers up to
the order of f32 sums, tests/test_int8.py), with the matrix-vector kernels as the CLI uses them, once per
``--prefill-precisions`` (``shardllama.kernels.gemm``: f32, and bf16 inputs with f32 sums where the CPU has
them; a row whose bf16 fell back to f32 is left out, saying so).  Prefill precision touches the products
over many rows: the whole text pass below and prompts of 9 or more tokens, never a decode step.

- Perplexity: exp of the mean negative log-likelihood of every token of a fixed English text
  (``--text``, default tools/data/wind-in-the-willows.txt, public domain) given the ones before it, in one
  forward pass.  On the same pass, against the baseline: the share of positions whose most likely next
  token is the baseline's, and the mean KL divergence from the baseline's next-token distribution (both
  teacher-forced, so one early difference does not decide the rest).  That pass multiplies many rows at
  once (the prefill kernels); ``--decode-text`` also feeds the text one token at a time, as decoding does
  (the matrix-vector kernels), and reports that top-1 agreement too.
- Greedy agreement with ``--baseline`` (f16): each of a few fixed prompts is continued greedily for
  ``--tokens`` tokens (end tokens ignored, so every continuation has that length); agreement is the
  fraction of positions holding the same token as the baseline's continuation, and the first divergence
  the index of the first token that differs (none: all identical).  After a divergence the two texts go
  their own ways, so agreement after it measures little; the first divergence is the sharper figure.
- A bf16-prefill row is also compared with the f32-prefill row of the same weights: its perplexity change
  and the share of text positions with the same most likely next token (teacher-forced).

Writes ``quality-<model>.json`` and ``quality-<model>.md`` to --out-dir (tools/results) and prints the table.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
# Put this checkout ahead of any installed shardllama, so the engine measured is the one beside this file;
# then tools/ (tools/bench_models.py), also where this file is imported rather than run (the tests).
sys.path[:0] = [str(HERE.parent), str(HERE)]

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from shardllama.kernels import build, gemm  # noqa: E402
from shardllama.loading import load_weights, open_checkpoint  # noqa: E402
from shardllama.model import DTYPES, Transformer  # noqa: E402
from shardllama.kv_cache import blocks_for  # noqa: E402
from shardllama.runtime import resolve_dtype  # noqa: E402
from shardllama.tokenizer_files import load_tokenizer  # noqa: E402

PROMPTS = [
    "The meaning of life is",
    "Once upon a time, in a small village by the sea,",
    "The three most important inventions of the twentieth century are",
    "def fibonacci(n):",
    "Photosynthesis is the process by which",
    "Dear Sir, I am writing to complain about",
    "The recipe calls for two cups of flour,",
    "In 1492, Columbus",
]


def text_logits(model: Transformer, tokens: list[int]) -> torch.Tensor:
    """Log-probabilities of the next token after every token of the text but the last: (T - 1, vocab) f64."""
    logits = model.forward(torch.tensor([tokens]), model.new_cache(blocks_for(model.max_seq_len)), all_logits=True)[0, :-1]  # (T - 1, vocab)
    return torch.log_softmax(logits.double(), dim=-1)


def stepped_top1(model: Transformer, tokens: list[int]) -> torch.Tensor:
    """The most likely next token after every token of the text but the last, fed one token at a time as
    decoding feeds them (matrix-vector kernels, not the prefill ones): (T - 1,) long."""
    cache = model.new_cache(blocks_for(model.max_seq_len))
    return torch.stack([model.forward(torch.tensor([[t]]), cache, start=i)[0].argmax()
                        for i, t in enumerate(tokens[:-1])])


def perplexity(logp: torch.Tensor, tokens: list[int]) -> tuple[float, float]:
    """(perplexity, mean negative log-likelihood in nats) of tokens[1:] given the tokens before each."""
    nll = float(F.nll_loss(logp, torch.tensor(tokens[1:])))
    return math.exp(nll), nll


def against(logp: torch.Tensor, base: torch.Tensor) -> tuple[float, float]:
    """Teacher-forced comparison on the text: the fraction of positions whose most likely next token is the
    baseline's, and the mean KL divergence KL(baseline || this) in nats."""
    top1 = float((logp.argmax(-1) == base.argmax(-1)).double().mean())
    kl = float((base.exp() * (base - logp)).sum(-1).mean())
    return top1, kl


def greedy(model: Transformer, prompt: list[int], n: int) -> list[int]:
    """n argmax tokens after the prompt, one decode step at a time (as generation runs)."""
    cache = model.new_cache(blocks_for(model.max_seq_len))
    logits = model.forward(torch.tensor([prompt]), cache)
    out = []
    for i in range(n):
        out.append(int(logits.argmax(-1)))
        if i + 1 < n:
            logits = model.forward(torch.tensor([[out[-1]]]), cache, start=len(prompt) + i)
    return out


def agreement(ours: list[int], theirs: list[int]) -> tuple[float, int | None]:
    same = [a == b for a, b in zip(ours, theirs)]
    first = next((i for i, s in enumerate(same) if not s), None)
    return sum(same) / len(same), first


def verdicts(rows: dict[str, dict], baseline: str, min_top1: float) -> list[str]:
    """One line per row but the baseline's: PASS or FAIL against ``min_top1`` on its teacher-forced top-1
    agreement with the baseline -- the text pass, and the decode-step pass where there was one."""
    out = []
    for name, r in rows.items():
        if name == baseline:
            continue
        shares = {"text": r["text_top1_agreement"], "decode steps": r.get("decode_top1_agreement")}
        shares = {k: v for k, v in shares.items() if v is not None}
        ok = all(v >= min_top1 for v in shares.values())
        out.append(f"{'PASS' if ok else 'FAIL'} {name} ({r['weights']} weights): top-1 agreement with {baseline} "
                   + ", ".join(f"{k} {100 * v:.1f}%" for k, v in shares.items()) + f" (target >= {100 * min_top1:g}%)")
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model-path", help="a GGUF or checkpoint, or a name from tools/bench_models.py (demo-q8_0...); "
                   "default: the demo model")
    p.add_argument("--dtypes", nargs="+", choices=["auto", *DTYPES], default=["f32", "f16", "bf16", "int8"],
                   help="weight dtypes to load the model in; auto: as the CLI's default --dtype resolves it")
    p.add_argument("--baseline", choices=list(DTYPES), default="f16",
                   help="agreement against this dtype (at f32 prefill)")
    p.add_argument("--prefill-precisions", nargs="+", choices=gemm.PRECISIONS, default=["f32"],
                   help="prefill precisions to run each dtype at (f32 always runs: the others compare with it)")
    p.add_argument("--text", type=Path, default=HERE / "data" / "wind-in-the-willows.txt")
    p.add_argument("--tokens", type=int, default=64, help="greedy tokens per prompt")
    p.add_argument("--decode-text", action="store_true",
                   help="also feed the text one token at a time (the decode kernels): top-1 agreement of that pass")
    p.add_argument("--min-top1", type=float, metavar="FRACTION",
                   help="exit with status 1 if a row's teacher-forced top-1 agreement with the baseline is below this")
    p.add_argument("--out-dir", type=Path, default=HERE / "results")
    a = p.parse_args(argv)

    if a.model_path is None:
        from shardllama.demo import demo_model_path

        a.model_path = demo_model_path()
    else:
        from bench_models import model_path  # tools/, beside this file: a bench name, or the path as given

        a.model_path = model_path(a.model_path)
    dtypes = list(dict.fromkeys([a.baseline] + a.dtypes))  # the baseline first: the others compare with it
    ckpt = open_checkpoint(a.model_path)
    weight_dtypes = {d: resolve_dtype(d, ckpt.native_dtype, ckpt.quant_types, ckpt.args) for d in dtypes}
    weight_names = {d: next(n for n, t in DTYPES.items() if t == weight_dtypes[d]) for d in dtypes}
    tok = load_tokenizer(ckpt.tokenizer_path, gguf_fields=ckpt.gguf_fields)
    text = a.text.read_text(encoding="utf-8")
    text_ids = tok.encode(text)
    prompt_ids = [tok.encode(prompt) for prompt in PROMPTS]
    max_len = max(len(text_ids), max(map(len, prompt_ids)) + a.tokens) + 1
    print(f"{a.model_path.name}: text {a.text.name} ({len(text_ids)} tokens), {len(PROMPTS)} prompts x "
          f"{a.tokens} greedy tokens", file=sys.stderr)

    precisions = list(dict.fromkeys(["f32"] + a.prefill_precisions))  # f32 first: the others compare with it
    rows, continuations, base_logp, base_steps = {}, {}, None, None
    for dtype in dtypes:
        weights = load_weights(ckpt, weight_dtypes[dtype])  # shared by the models of every precision
        same_weights_logp = None
        for precision in precisions:
            if precision != "f32" and weight_dtypes[dtype] not in (torch.float16, torch.float32):
                continue  # int8 and bf16 weights never go through kernels.gemm: the f32 row says it all
            t0 = time.perf_counter()
            model = Transformer(ckpt.args, weights, max_seq_len=max_len, prefill_precision=precision)
            if model.prefill_precision != precision:  # bf16 on a CPU without it: that would be f32 again
                print(f"{dtype}: no {precision} prefill on this CPU, row left out", file=sys.stderr)
                continue
            name = dtype if precision == "f32" else f"{dtype}, {precision} prefill"
            logp = text_logits(model, text_ids)
            base_logp = logp if base_logp is None else base_logp  # the baseline comes first
            same_weights_logp = logp if same_weights_logp is None else same_weights_logp  # f32 prefill comes first
            ppl, nll = perplexity(logp, text_ids)
            top1, kl = against(logp, base_logp)
            continuations[name] = [greedy(model, ids, a.tokens) for ids in prompt_ids]
            steps_top1 = None
            if a.decode_text and precision == "f32":  # decode steps never use the prefill precision
                steps = stepped_top1(model, text_ids)
                base_steps = steps if base_steps is None else base_steps
                steps_top1 = float((steps == base_steps).double().mean())
            rows[name] = {"dtype": dtype, "weights": weight_names[dtype], "prefill_precision": precision,
                          "perplexity": ppl, "nll": nll, "text_top1_agreement": top1, "text_kl": kl,
                          "decode_top1_agreement": steps_top1,
                          "text_top1_vs_f32_prefill": against(logp, same_weights_logp)[0],
                          "seconds": time.perf_counter() - t0}
            print(f"{name}: perplexity {ppl:.4f} ({time.perf_counter() - t0:.0f} s)", file=sys.stderr, flush=True)
            del model, logp
        del weights, same_weights_logp
    for name, row in rows.items():
        per_prompt = [agreement(c, b) for c, b in zip(continuations[name], continuations[a.baseline])]
        row["agreement"] = sum(x for x, _ in per_prompt) / len(per_prompt)
        row["first_divergence"] = [d for _, d in per_prompt]
        row["perplexity_vs_f32_prefill"] = row["perplexity"] / rows[row["dtype"]]["perplexity"] - 1

    base = rows[a.baseline]["perplexity"]
    label = a.model_path.name.removesuffix(".gguf") + ("-prefill" if len(precisions) > 1 else "")
    lines = [f"{label}: perplexity on {a.text.name} ({len(text_ids)} tokens); on the same text, teacher-forced, "
             f"the share of positions whose most likely next token is {a.baseline}'s and the mean KL({a.baseline} "
             f"|| weights); greedy agreement with {a.baseline} over the first {a.tokens} tokens of {len(PROMPTS)} "
             "prompts, and the first divergence (index of the first differing token per prompt, - = none); "
             "a bf16-prefill row (f16/f32 weights) also against the f32-prefill row of its weights (perplexity change, text top-1)",
             "", f"| weights | perplexity | vs {a.baseline} | text top-1 = {a.baseline} | text KL (nats) "
             f"| greedy agreement with {a.baseline} | first divergence | perplexity vs f32 prefill "
             "| text top-1 = f32 prefill |" + (f" decode-step top-1 = {a.baseline} |" if a.decode_text else ""),
             "|---|---|---|---|---|---|---|---|---|" + ("---|" if a.decode_text else "")]
    for name, r in rows.items():
        first = ", ".join("-" if d is None else str(d) for d in r["first_divergence"])
        vs_f32 = ("| | |" if r["prefill_precision"] == "f32" else
                  f"| {100 * r['perplexity_vs_f32_prefill']:+.2f}% | {100 * r['text_top1_vs_f32_prefill']:.1f}% |")
        if a.decode_text:
            steps = r["decode_top1_agreement"]
            vs_f32 += f" {100 * steps:.1f}% |" if steps is not None else " |"
        shown = name if r["weights"] == r["dtype"] else name.replace(r["dtype"], f"{r['dtype']} ({r['weights']})", 1)
        lines.append(f"| {shown} | {r['perplexity']:.3f} | {100 * (r['perplexity'] / base - 1):+.2f}% | "
                     f"{100 * r['text_top1_agreement']:.1f}% | {r['text_kl']:.5f} | {100 * r['agreement']:.1f}% "
                     f"| {first} {vs_f32}")
    checks = verdicts(rows, a.baseline, a.min_top1) if a.min_top1 is not None else []
    table = "\n".join(lines + [""] + [f"- {c}" for c in checks]) + "\n"
    print("\n" + table)

    a.out_dir.mkdir(parents=True, exist_ok=True)
    meta = dict(model=str(a.model_path.name), text=a.text.name, text_tokens=len(text_ids), prompts=PROMPTS,
                greedy_tokens=a.tokens, baseline=a.baseline, torch=torch.__version__, machine=platform.machine(),
                cpu_flags=build.cpu_flags(("avx512f", "avx512_bf16", "amx_bf16", "avx512_fp16")),
                date=time.strftime("%Y-%m-%d"), rows=list(rows.values()), min_top1=a.min_top1, checks=checks,
                continuations={name: [tok.decode(c) for c in cs] for name, cs in continuations.items()})
    (a.out_dir / f"quality-{label}.json").write_text(json.dumps(meta, indent=1, ensure_ascii=False) + "\n")
    (a.out_dir / f"quality-{label}.md").write_text(table)
    return 1 if any(c.startswith("FAIL") for c in checks) else 0


if __name__ == "__main__":
    sys.exit(main())
