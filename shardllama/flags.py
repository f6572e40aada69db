"""The command line's flags, and the config objects built from them once, here at the edge.

:func:`parse_args` reads the command line; :func:`runtime_config`, :func:`sampling`,
:func:`server_config` and :func:`interactive_options` turn its namespace into the frozen settings that the
library takes (``runtime.RuntimeConfig``, ``sampling.SamplingParams``, ``server.config.ServerConfig``,
``interactive.TurnOptions``): nothing below ``cli`` sees an argparse namespace.  Every flag and its
validator is written here once.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Sequence

from . import cli_common
from .errors import UsageError
from .server.config import (API_KEY_ENV, DEFAULT_API_PATH, DEFAULT_HOST, DEFAULT_MAX_CONCURRENT, DEFAULT_MAX_QUEUE,
                            DEFAULT_PORT, DEFAULT_PROMPT_CACHE_MEMORY_MIB, DEFAULT_PROMPT_CACHE_SIZE)

SUBCOMMANDS = ("generate", "chat", "serve", "worker", "shards", "keys")


class _Parser(argparse.ArgumentParser):
    """argparse that reports a bad flag in one line (and exit code 2) instead of usage + error."""

    def error(self, message: str):  # type: ignore[override]
        raise UsageError(f"{message} (see {self.prog} --help)")


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def _non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
    return value


_positive_int.__name__ = "positive integer"
_non_negative_int.__name__ = "non-negative integer"


def add_model_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("model")
    g.add_argument("--model-path", type=Path, help="model directory or file (Meta .pth, safetensors, GGUF); "
                   "default: the SmolLM2-135M-Instruct demo model, downloaded once and cached")
    g.add_argument("--param-path", type=Path, help="params.json / config.json, if not beside the model")
    g.add_argument("--tokenizer-path", type=Path, help="tokenizer.model / tokenizer.json, if not beside the model")
    g.add_argument("--dtype", default="auto", choices=("auto", "f32", "f16", "bf16", "int8", "gguf", "q8", "q4"),
                   help="weight precision (auto: as stored, a quantized GGUF's blocks computed in place (gguf) "
                        "where the CPU has AVX-512, else widened to f16 (int8 where f16 would not fit); "
                        "int8: quantized at load time, one scale per row; q8 / q4: quantized at load time to "
                        "GGUF's Q8_0 / Q4_0 blocks; all of these compute in f32)")
    g.add_argument("--f16", dest="dtype", action="store_const", const="f16", help="alias for --dtype f16 (rllama)")
    g.add_argument("--max-seq-len", type=_positive_int,
                   help="context length to allocate (default: the model's trained context, at most 4096)")
    g.add_argument("--rope-scaling", metavar="factor=F,low=L,high=H,original=N",
                   help="llama3 rope-scaling numbers for a Meta params.json with use_scaled_rope, which states none "
                        "(default: Meta's factor=8,low=1,high=4,original=8192, or its rope_scaling_factor)")
    g.add_argument("--prefill-precision", choices=("f32", "bf16"),
                   help="precision of the matrix products over a prompt (9 or more rows): f32, exact (the default), "
                        "or bf16 inputs with f32 sums, where the CPU has AVX-512 BF16 or AMX (else f32, said once); "
                        "default: $SHARDLLAMA_PREFILL_PRECISION, else f32")
    g.add_argument("--max-threads", type=_positive_int,
                   help="torch threads in all (default: one per worker; torch's choice with --workers 0)")
    w = p.add_argument_group("workers")
    w.add_argument("--workers", type=_non_negative_int,
                   help="worker processes, each holding a slice of every layer (default: one per physical core); "
                        "0 = the single-process reference model")
    w.add_argument("--keep-shards", action="store_true",
                   help="leave the weight shards in shared memory so the next --keep-shards run with the same "
                        "model, dtype and --workers starts in seconds, mapping them if they are yours (see "
                        "`shardllama shards`)")
    w.add_argument("--listen", metavar="tcp://HOST:PORT",
                   help="wait for --workers remote workers (`shardllama worker --connect`) here instead of "
                        "starting local ones")
    w.add_argument("--worker-timeout", type=float, default=60.0,
                   help="seconds a worker may take for one step before the run fails naming it (default 60)")
    add_keys_dir_arg(w)
    add_device_args(w)
    w.add_argument("--insecure", action="store_true",
                   help="--listen without CurveZMQ: any peer that reaches the port may join as a worker and the "
                        "activations travel unencrypted (only on a network you trust)")


def add_device_args(w) -> None:
    """--device (and rllama's --opencl-device), --reduce: the GPU workers' flags (``devices``)."""
    w.add_argument("--device", metavar="cpu|cuda|cuda:K[,cuda:L...]",
                   help="where the workers compute: cpu (default), or one worker per GPU (cuda: every visible GPU; "
                        "--workers must equal the number listed), summing through NCCL")
    w.add_argument("--opencl-device", type=int, metavar="N", help="rllama's GPU flag: the same as --device cuda:N")
    w.add_argument("--reduce", choices=("shm", "dist"),
                   help="how local workers sum their partials: shm (shared memory; the default on CPUs) or dist "
                        "(torch.distributed: gloo on CPUs, NCCL on GPUs, where it is the only choice)")


def add_keys_dir_arg(p) -> None:
    from .curve import default_dir

    p.add_argument("--keys-dir", type=Path, default=default_dir(os.environ),
                   help="CurveZMQ keypair and authorized_workers/ for --listen (default %(default)s)")


def add_sampling_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("sampling")
    g.add_argument("--temperature", type=float, default=0.2, help="0 = greedy (default 0.2)")
    g.add_argument("--top-k", type=_non_negative_int, default=20, help="0 = no limit (default 20)")
    g.add_argument("--top-p", type=float, default=1.0, help="nucleus mass in (0, 1] (default 1.0)")
    g.add_argument("--repetition-penalty", type=float, default=1.0, help="> 1 discourages repeats (default 1.0 = off)")
    g.add_argument("--repetition-penalty-last-n", type=int, default=64,
                   help="recent tokens the penalty looks at; -1 = all (default 64)")
    g.add_argument("--min-p", type=_fraction, default=0.0,
                   help="keep tokens at least this fraction as likely as the most likely one, in [0, 1] (default 0 = off)")
    g.add_argument("--presence-penalty", type=_penalty, default=0.0,
                   help="subtracted once from the logit of each token already generated, in [-2, 2] (default 0)")
    g.add_argument("--frequency-penalty", type=_penalty, default=0.0,
                   help="times a token's count in the output, subtracted from its logit, in [-2, 2] (default 0)")
    g.add_argument("--logit-bias", type=_logit_bias, action="append", default=[], metavar="ID=BIAS",
                   help="add BIAS in [-100, 100] to token ID's logit (-100 bans it, 100 forces it); repeatable. "
                        "Order: logit bias, repetition, presence/frequency, temperature, min-p, top-k, top-p")
    g.add_argument("--seed", type=int, help="seed for reproducible sampling")


def _fraction(text: str) -> float:
    value = float(text)
    if not 0 <= value <= 1:
        raise argparse.ArgumentTypeError(f"must be in [0, 1], got {text}")
    return value


def _penalty(text: str) -> float:
    from .sampling import MAX_PENALTY

    value = float(text)
    if not -MAX_PENALTY <= value <= MAX_PENALTY:
        raise argparse.ArgumentTypeError(f"must be in [-{MAX_PENALTY:g}, {MAX_PENALTY:g}], got {text}")
    return value


def _logit_bias(text: str) -> tuple[int, float]:
    from .sampling import MAX_LOGIT_BIAS

    token, sep, bias = text.partition("=")
    try:
        pair = int(token), float(bias)
    except ValueError:
        pair = None
    if not sep or pair is None or pair[0] < 0 or not -MAX_LOGIT_BIAS <= pair[1] <= MAX_LOGIT_BIAS:
        raise argparse.ArgumentTypeError(f"expected ID=BIAS, a token id >= 0 and a bias in [-{MAX_LOGIT_BIAS:g}, "
                                         f"{MAX_LOGIT_BIAS:g}], got {text!r}")
    return pair


_fraction.__name__ = "number"
_penalty.__name__ = "number"


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="shardllama", description="LLaMA-family inference on CPUs, every layer split across worker processes.",
                     epilog="Without a command, the flags are generate's: shardllama --prompt \"The meaning of life is\" "
                            "continues the prompt with the demo model. Every command takes --help, --version, -v/-vv and "
                            "--log-level LEVEL.")
    cli_common.add_version(parser)
    sub = parser.add_subparsers(dest="command", parser_class=_Parser)

    gen = sub.add_parser("generate", help="continue a prompt (the default command)")
    add_model_args(gen)
    add_sampling_args(gen)
    g = gen.add_argument_group("generation")
    src = g.add_mutually_exclusive_group()
    src.add_argument("--prompt", help="text to continue")
    src.add_argument("--prompt-file", type=Path, help="read the prompt from this UTF-8 file")
    g.add_argument("--max-new-tokens", type=_non_negative_int, help="stop after this many tokens (default: until the end token or the context is full)")
    g.add_argument("--ignore-eos", action="store_true", help="keep generating past the end token")
    g.add_argument("--no-echo", action="store_true", help="print only the generated text, not the prompt")
    loud = g.add_mutually_exclusive_group()
    loud.add_argument("-q", "--quiet", action="store_true", help="no progress bar, no timings")
    cli_common.add_common(gen, verbose_into=loud, verbose_help="log more (-v info, -vv debug), and say where the "
                          "start-up went: one line per phase, in seconds")
    g.add_argument("--inference-server", action="store_true",
                   help="serve rllama's HTTP API instead of generating (same as `shardllama serve`)")
    add_server_args(gen)
    it = gen.add_argument_group("interactive mode (rllama's flags; see shardllama/interactive.py)")
    it.add_argument("--start-interactive", action="store_true",
                    help="read a line, answer it, ask again, continuing from the KV cache; Ctrl-D quits")
    it.add_argument("--interactive-system-prompt", help="text fed before the first line (default: the --prompt, if any)")
    it.add_argument("--interactive-stop", action="append", metavar="TEXT",
                    help="generated text that ends the model's turn, not printed (repeatable)")
    it.add_argument("--interactive-prompt-prefix", default="", metavar="TEXT", help="put before each line you type")
    it.add_argument("--interactive-prompt-postfix", default="", metavar="TEXT", help="put after each line you type")

    chat = sub.add_parser("chat", help="talk to the model through its own chat template")
    add_model_args(chat)
    add_sampling_args(chat)
    chat.add_argument("--system-prompt", help="the conversation's system message (default: the template's own)")
    chat.add_argument("--max-new-tokens", type=_non_negative_int, help="longest answer per turn (default: until the end of turn)")
    chat.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    cli_common.add_common(chat)

    serve = sub.add_parser("serve", help="serve rllama's HTTP inference API (JSONL streaming, batching, prompt cache)")
    add_model_args(serve)
    add_server_args(serve)
    serve.add_argument("-q", "--quiet", action="store_true", help="no progress bar, no start-up lines")
    cli_common.add_common(serve)

    sub.add_parser("worker", add_help=False, help="run a worker for a coordinator on another host "
                   "(shardllama worker --connect tcp://HOST:PORT --model-path PATH; --help for more)")

    shards = sub.add_parser("shards", help="show or remove weight shards kept in shared memory (--keep-shards)")
    shards.add_argument("action", choices=("list", "clean"))
    shards.add_argument("--key", help="clean only this set (default: every kept set of yours; other users' sets "
                                      "are never removed)")
    cli_common.add_common(shards)

    keys = sub.add_parser("keys", help="make this user's CurveZMQ keypair for --listen and remote workers (once), "
                          "print its public key")
    add_keys_dir_arg(keys)
    keys.add_argument("--authorize", type=Path, metavar="FILE",
                      help="also accept the worker whose public key file (its shardllama.key) this is")
    cli_common.add_common(keys)
    return parser


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    argv = list(argv)
    # Plain `shardllama --prompt ...` means `shardllama generate --prompt ...`.
    if not argv or (argv[0] not in SUBCOMMANDS and argv[0] not in ("-h", "--help", "--version")):
        argv.insert(0, "generate")
    if argv[0] == "worker":  # the worker parses its own flags
        return argparse.Namespace(command="worker", worker_argv=argv[1:])
    return build_parser().parse_args(argv)


def _int_at_least(minimum: int, what: str):
    def parse(text: str) -> int:
        value = int(text)
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be >= {minimum}, got {value}")
        return value

    parse.__name__ = what
    return parse


def add_server_args(p: argparse.ArgumentParser) -> None:
    """rllama's ``--inference-server-*`` flags, and ours: the cache's memory budget and directory, the queue,
    the access rules (:mod:`.access`)."""
    g = p.add_argument_group("inference server (rllama's HTTP API)")
    g.add_argument("--inference-server-host", default=DEFAULT_HOST, help=f"address to listen on (default {DEFAULT_HOST})")
    g.add_argument("--inference-server-port", type=_int_at_least(0, "port"), default=DEFAULT_PORT,
                   help=f"port to listen on; 0 = any free port (default {DEFAULT_PORT})")
    g.add_argument("--inference-server-api-path", default=DEFAULT_API_PATH,
                   help=f"path of the inference endpoint (default {DEFAULT_API_PATH})")
    g.add_argument("--inference-server-max-concurrent-inferences", type=_int_at_least(1, "positive integer"),
                   default=DEFAULT_MAX_CONCURRENT,
                   help=f"generations decoded together; more wait in the queue (default {DEFAULT_MAX_CONCURRENT})")
    g.add_argument("--inference-server-max-queue", type=_int_at_least(0, "non-negative integer"),
                   default=DEFAULT_MAX_QUEUE,
                   help=f"requests that may wait for a free place; beyond that the server answers 503 "
                        f"(default {DEFAULT_MAX_QUEUE})")
    g.add_argument("--inference-server-prompt-cache-size", type=_int_at_least(0, "non-negative integer"),
                   default=DEFAULT_PROMPT_CACHE_SIZE,
                   help=f"KV states of earlier prompts kept for reuse; 0 = off (default {DEFAULT_PROMPT_CACHE_SIZE})")
    g.add_argument("--inference-server-prompt-cache-memory", type=_int_at_least(0, "non-negative integer"),
                   default=DEFAULT_PROMPT_CACHE_MEMORY_MIB, metavar="MIB",
                   help="memory the prompt cache may take, in MiB: an entry holds the KV-cache blocks (16 positions "
                        "each) its tokens fill, entries share the blocks of a common prefix, and memory is taken as "
                        f"blocks fill (default {DEFAULT_PROMPT_CACHE_MEMORY_MIB})")
    g.add_argument("--prompt-cache-dir", metavar="DIR",
                   help="keep the prompt cache's entries in this directory too (safetensors files), so they "
                        "survive a restart; at most --inference-server-prompt-cache-size of this model's entries, "
                        "least recently used deleted first")
    g.add_argument("--inference-server-exit-after-one-query", action="store_true",
                   help="exit (code 0) after the first inference request has been answered")
    g.add_argument("--allowed-hosts", action="append", metavar="HOST[,HOST...]",
                   help="Host header names the server answers (any port; '*' = any), besides localhost, 127.0.0.1 "
                        "and [::1]. Default: on a loopback bind only those three (against DNS rebinding); on any "
                        "other bind any name")
    g.add_argument("--cors-origin", action="append", metavar="ORIGIN",
                   help="let web pages from ORIGIN (scheme://host[:port], or '*') call both APIs from a browser; "
                        "repeatable. Default: none (CORS off)")
    g.add_argument("--api-key", metavar="KEY",
                   help=f"require 'Authorization: Bearer KEY' on every route of both APIs (401 otherwise); "
                        f"default: ${API_KEY_ENV} if set (an argument is visible to other users in ps)")


def runtime_config(ns: argparse.Namespace):
    """The model and worker flags of :func:`add_model_args`."""
    from . import devices
    from .rope import parse_override
    from .runtime import RuntimeConfig

    device_list, workers = devices.resolve(devices.from_flags(ns.device, ns.opencl_device), ns.workers)
    if device_list and ns.listen:
        raise UsageError("--device cuda runs local workers, one per GPU; --listen waits for remote ones")
    if device_list and ns.reduce == "shm":
        raise UsageError("--reduce shm: GPU workers sum through torch.distributed (NCCL); leave --reduce out")
    return RuntimeConfig(
        devices=device_list, reduce=ns.reduce,
        model_path=ns.model_path, param_path=ns.param_path, tokenizer_path=ns.tokenizer_path, dtype=ns.dtype,
        max_seq_len=ns.max_seq_len, rope_override=parse_override(ns.rope_scaling) if ns.rope_scaling else None,
        prefill_precision=ns.prefill_precision, max_threads=ns.max_threads, workers=workers,
        keep_shards=ns.keep_shards, listen=ns.listen, worker_timeout=ns.worker_timeout, keys_dir=ns.keys_dir,
        insecure=ns.insecure, quiet=getattr(ns, "quiet", False))


def sampling(ns: argparse.Namespace):
    """(SamplingParams, seed or None) of :func:`add_sampling_args`."""
    from .sampling import SamplingParams

    tokens = [token for token, _ in ns.logit_bias]
    if len(set(tokens)) < len(tokens):
        twice = next(t for t in tokens if tokens.count(t) > 1)
        raise UsageError(f"--logit-bias names token {twice} twice")
    params = SamplingParams(ns.temperature, ns.top_k, ns.top_p, ns.repetition_penalty, ns.repetition_penalty_last_n,
                            min_p=ns.min_p, presence_penalty=ns.presence_penalty,
                            frequency_penalty=ns.frequency_penalty, logit_bias=ns.logit_bias)
    return params, ns.seed


def check_vocab(params, vocab_size: int) -> None:
    """UsageError naming --logit-bias when it names a token the model (``vocab_size`` logits) does not have."""
    try:
        params.check_vocab(vocab_size)
    except UsageError as e:
        raise UsageError(str(e).replace("logit_bias", "--logit-bias", 1)) from None


def server_config(ns: argparse.Namespace):
    """The server flags of :func:`add_server_args` (the API key from $SHARDLLAMA_API_KEY if not given); a bad
    value fails here, before a model is opened."""
    from .server.config import ServerConfig

    return ServerConfig(
        host=ns.inference_server_host, port=ns.inference_server_port, api_path=ns.inference_server_api_path,
        max_concurrent=ns.inference_server_max_concurrent_inferences, max_queue=ns.inference_server_max_queue,
        prompt_cache_size=ns.inference_server_prompt_cache_size,
        prompt_cache_memory_mib=ns.inference_server_prompt_cache_memory, prompt_cache_dir=ns.prompt_cache_dir,
        exit_after_one_query=ns.inference_server_exit_after_one_query,
        allowed_hosts=tuple(h for entry in ns.allowed_hosts or () for h in entry.split(",") if h.strip()),
        cors_origins=tuple(ns.cors_origin or ()),
        api_key=ns.api_key if ns.api_key is not None else os.environ.get(API_KEY_ENV) or None,
        quiet=getattr(ns, "quiet", False))


def interactive_options(ns: argparse.Namespace, system_prompt: str | None = None):
    """The interactive-mode flags (``generate --start-interactive``) or chat's."""
    from .interactive import TurnOptions

    return TurnOptions(
        max_new_tokens=ns.max_new_tokens, stop_strings=tuple(getattr(ns, "interactive_stop", None) or ()),
        prefix=getattr(ns, "interactive_prompt_prefix", ""), postfix=getattr(ns, "interactive_prompt_postfix", ""),
        ignore_eos=getattr(ns, "ignore_eos", False), echo=not getattr(ns, "no_echo", False),
        system_prompt=system_prompt)
