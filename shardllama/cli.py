"""The ``shardllama`` command.

``shardllama [generate] --prompt ...`` streams a continuation to stdout and prints timings to stderr.
Every user mistake ends in one line on stderr and exit code 1 (2 for usage errors), never a traceback.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import signal
import sys
from pathlib import Path
from typing import Sequence

from .errors import PromptTooLongError, ShardllamaError, UsageError
from .phases import Phases
from .server import add_server_args

log = logging.getLogger("shardllama")

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
    g.add_argument("--dtype", default="auto", choices=("auto", "f32", "f16", "bf16", "int8"),
                   help="weight precision (auto: as stored, and quantized GGUF types as int8; int8: quantized at "
                        "load time, one scale per row, computing in f32)")
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
    w.add_argument("--insecure", action="store_true",
                   help="--listen without CurveZMQ: any peer that reaches the port may join as a worker and the "
                        "activations travel unencrypted (only on a network you trust)")


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
    g.add_argument("--seed", type=int, help="seed for reproducible sampling")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="shardllama", description="LLaMA-family inference on CPUs, every layer split across worker processes.")
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
    loud.add_argument("-v", "--verbose", action="store_true",
                      help="also say where the start-up went: one line per phase, in seconds")
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

    serve = sub.add_parser("serve", help="serve rllama's HTTP inference API (JSONL streaming, batching, prompt cache)")
    add_model_args(serve)
    add_server_args(serve)
    serve.add_argument("-q", "--quiet", action="store_true", help="no progress bar, no start-up lines")

    sub.add_parser("worker", add_help=False, help="run a worker for a coordinator on another host "
                   "(shardllama worker --connect tcp://HOST:PORT --model-path PATH; --help for more)")

    shards = sub.add_parser("shards", help="show or remove weight shards kept in shared memory (--keep-shards)")
    shards.add_argument("action", choices=("list", "clean"))
    shards.add_argument("--key", help="clean only this set (default: every kept set of yours; other users' sets "
                                      "are never removed)")

    keys = sub.add_parser("keys", help="make this user's CurveZMQ keypair for --listen and remote workers (once), "
                          "print its public key")
    add_keys_dir_arg(keys)
    keys.add_argument("--authorize", type=Path, metavar="FILE",
                      help="also accept the worker whose public key file (its shardllama.key) this is")
    return parser


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    argv = list(argv)
    # Plain `shardllama --prompt ...` means `shardllama generate --prompt ...`.
    if not argv or (argv[0] not in SUBCOMMANDS and argv[0] not in ("-h", "--help")):
        argv.insert(0, "generate")
    if argv[0] == "worker":  # the worker parses its own flags
        return argparse.Namespace(command="worker", worker_argv=argv[1:])
    return build_parser().parse_args(argv)


def _read_prompt(args: argparse.Namespace) -> str:
    if args.prompt_file is not None:
        try:
            return args.prompt_file.read_text(encoding="utf-8")
        except FileNotFoundError:
            raise UsageError(f"--prompt-file {args.prompt_file}: file not found") from None
        except (OSError, UnicodeDecodeError) as e:
            raise UsageError(f"--prompt-file {args.prompt_file}: cannot read ({e})") from None
    if args.prompt is None:
        raise UsageError("give a prompt with --prompt or --prompt-file")
    return args.prompt


def cmd_serve(args: argparse.Namespace) -> int:
    from .server import serve_from_args

    return serve_from_args(args)


def _colour() -> bool:
    return sys.stdout.isatty() and not os.environ.get("NO_COLOR")


def cmd_chat(args: argparse.Namespace) -> int:
    from .interactive import run_chat

    with open_model_from_args(args, progress=not args.quiet and sys.stderr.isatty()) as model:
        return run_chat(model, args, colour=_colour())


def cmd_generate(args: argparse.Namespace) -> int:
    if args.start_interactive:
        from .interactive import run_interactive

        system = args.interactive_system_prompt
        if system is None and (args.prompt is not None or args.prompt_file is not None):
            system = _read_prompt(args)
        with open_model_from_args(args, progress=not args.quiet and sys.stderr.isatty()) as model:
            return run_interactive(model, args, system, colour=_colour())
    if args.inference_server:  # rllama's spelling of `shardllama serve`
        return cmd_serve(args)
    phases = Phases.from_process_start()  # the command's start-up, up to the first token
    prompt = _read_prompt(args)
    progress = not args.quiet and sys.stderr.isatty()
    import torch

    from . import runtime  # noqa: F401 (imported here, so that its imports count as imports)
    from .engine import Sequence, Stats, generate
    from .sampling import SamplingParams

    params = SamplingParams(args.temperature, args.top_k, args.top_p, args.repetition_penalty,
                            args.repetition_penalty_last_n)
    phases.until_now("python and imports")
    with _early_workers(args, phases) as local_workers:
        with phases("model header and tokenizer"):
            prepared = prepare_from_args(args, progress=progress)
        with prepared:
            with phases("tokenize the prompt"):
                prompt_ids = prepared.tokenizer.encode(prompt)
            if len(prompt_ids) > prepared.max_seq_len:  # checked before a single weight is read
                raise PromptTooLongError(f"prompt is {len(prompt_ids)} tokens, longer than --max-seq-len "
                                         f"{prepared.max_seq_len}")
            model = start_from_args(args, prepared, progress=progress, phases=phases, local_workers=local_workers)
    startup_s = None
    with model:
        tok = model.tokenizer
        generator = torch.Generator().manual_seed(args.seed) if args.seed is not None else None
        stats = Stats()
        out = sys.stdout
        if not args.no_echo:
            out.write(prompt)
            out.flush()
        stream = tok.stream()
        stop_ids = () if args.ignore_eos else tok.stop_ids
        for event in generate(model.backend, Sequence(), prompt_ids, params, max_new_tokens=args.max_new_tokens,
                              stop_ids=stop_ids, generator=generator, stats=stats):
            if startup_s is None:
                startup_s = phases.elapsed()
                phases.add("prefill and first token", stats.first_token_s)
            if event.is_end:
                break
            text = stream.push(event.token)
            if text:
                out.write(text)
                out.flush()
        out.write(stream.flush() + "\n")
        out.flush()
        if not args.quiet:
            _print_stats(stats, startup_s)
        if args.verbose and startup_s is not None:
            print("\n".join(phases.lines(startup_s)), file=sys.stderr)
    return 0


def prepare_from_args(args: argparse.Namespace, *, progress: bool = False):
    """The model flags of add_model_args, checked against the checkpoint's headers and tokenizer
    (runtime.prepare): nothing is loaded yet."""
    from .rope import parse_override
    from .runtime import prepare

    rope = parse_override(args.rope_scaling) if args.rope_scaling else None
    return prepare(args.model_path, param_path=args.param_path, tokenizer_path=args.tokenizer_path,
                   dtype=args.dtype, max_seq_len=args.max_seq_len, rope_override=rope, progress=progress)


def _early_workers(args: argparse.Namespace, phases: Phases | None = None):
    """The local workers of the worker flags, started now (forked: ``launch``), so that they are ready
    while this process reads the model's header and writes the shards: a context manager giving a
    LocalWorkers, or None for --workers 0 and --listen."""
    if args.workers == 0 or args.listen:
        return contextlib.nullcontext()
    from .launch import LocalWorkers, default_workers

    with (phases if phases is not None else Phases())("start worker processes"):
        return LocalWorkers(args.workers or default_workers(), threads=_threads_per_worker(args))


def _threads_per_worker(args: argparse.Namespace) -> int:
    if not args.max_threads or args.workers == 0:
        return 1
    from .launch import default_workers

    return max(1, args.max_threads // (args.workers or default_workers()))


def start_from_args(args: argparse.Namespace, prepared, *, n_slots: int = 1, progress: bool = False, phases=None,
                    local_workers=None):
    """A prepared model, loaded and running with the worker flags of add_model_args (``phases``: a
    :class:`~shardllama.phases.Phases` to time the load with; ``local_workers``: _early_workers')."""
    import torch

    from .kernels import gemm
    from .runtime import start
    from .sharding import check_workers

    if args.workers:
        check_workers(prepared.args, args.workers)  # a usage error, before the notes and the load
    prefill = gemm.resolve(args.prefill_precision)  # a bad $SHARDLLAMA_PREFILL_PRECISION too, before the load
    if not getattr(args, "quiet", False):
        for note in prepared.notes:
            log.warning("%s", note)
    if args.workers == 0:
        if args.max_threads:
            torch.set_num_threads(args.max_threads)  # the reference model computes in this process
    else:
        # The coordinator's own work (converting the weights, embedding rows, sums) on one thread: the cores are
        # the workers'.  With two threads on a VM whose other core was busy, every small op waited for the second
        # thread to be scheduled: loading the demo model took 20 s instead of 1 s.
        torch.set_num_threads(1)
    return start(prepared, n_slots=n_slots, workers=args.workers, keep_shards=args.keep_shards, listen=args.listen,
                 worker_timeout=args.worker_timeout, threads_per_worker=_threads_per_worker(args), progress=progress,
                 keys_dir=args.keys_dir, insecure=args.insecure, phases=phases, local_workers=local_workers,
                 prefill_precision=prefill)


def open_model_from_args(args: argparse.Namespace, *, progress: bool = False):
    """prepare_from_args then start_from_args, for interactive mode and chat."""
    with _early_workers(args) as local_workers, prepare_from_args(args, progress=progress) as prepared:
        return start_from_args(args, prepared, progress=progress, local_workers=local_workers)


def cmd_worker(args: argparse.Namespace) -> int:
    from workers import main as worker_main

    return worker_main(args.worker_argv)


def cmd_shards(args: argparse.Namespace) -> int:
    from .shm import clean_kept, list_kept

    if args.action == "clean":
        removed = clean_kept(args.key)
        print(f"removed {len(removed)} shared-memory segment(s)")
        others = sum(len(s.segments) for s in list_kept() if s.foreign and args.key in (None, s.key))
        if others:
            print(f"left {others} segment(s) of other users (`shardllama shards list` shows them)")
        return 0
    sets = list_kept()
    if not sets:
        print("no shard sets in shared memory")
    for s in sets:
        if s.foreign:
            state = f"foreign: of {_user(s.uid)}, never mapped"
        else:
            state = "kept" if s.kept else ("orphaned" if s.orphaned else f"in use by pid {s.owner_pid}")
        # Manifests are anyone's text (another user's set): no terminal escape sequence gets printed.
        line = f"{s.key}  {s.nbytes / 2**20:,.0f} MiB  {s.dtype}  {s.n_workers} workers  {state}  {s.model}"
        print("".join(c if c.isprintable() else "?" for c in line))
    return 0


def _user(uid: int) -> str:
    import pwd

    try:
        return f"user {pwd.getpwuid(uid).pw_name} (uid {uid})"
    except KeyError:
        return f"uid {uid}"


def cmd_keys(args: argparse.Namespace) -> int:
    from .curve import AUTHORIZED, authorize, make_keys

    public, made = make_keys(args.keys_dir)
    print(f"{'made' if made else 'found'} the CurveZMQ keypair in {args.keys_dir}; public key:", file=sys.stderr)
    print(public.decode())
    if args.authorize is not None:
        print(f"authorized {authorize(args.keys_dir, args.authorize)}", file=sys.stderr)
    elif made:
        print(f"workers with this keypair are accepted; accept another with `shardllama keys --authorize FILE` "
              f"(its shardllama.key), which lands in {args.keys_dir / AUTHORIZED}", file=sys.stderr)
    return 0


def _print_stats(stats, startup_s: float | None) -> None:
    startup = f"start-up to first token: {startup_s:.2f} s; " if startup_s is not None else ""
    print(
        f"prompt: {stats.prompt_tokens} tokens, {stats.prefill_s * 1000:.1f} ms ({stats.prefill_tok_s:.1f} tok/s); "
        f"time to first token: {stats.first_token_s * 1000:.1f} ms; {startup}"
        f"generated: {stats.generated} tokens, {stats.ms_per_token:.1f} ms/token",
        file=sys.stderr,
    )


COMMANDS = {"generate": cmd_generate, "chat": cmd_chat, "serve": cmd_serve, "worker": cmd_worker, "shards": cmd_shards,
            "keys": cmd_keys}


class _Terminated(BaseException):
    """SIGTERM, turned into an exception so that every context manager (workers, shards) closes."""


def _on_sigterm(signum, frame):
    raise _Terminated()


def main(argv: Sequence[str] | None = None) -> int:
    logging.basicConfig(level=logging.WARNING, format="shardllama: %(message)s")
    signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        args = parse_args(sys.argv[1:] if argv is None else argv)
        return COMMANDS[args.command](args)
    except ShardllamaError as e:
        print(f"shardllama: error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("\nshardllama: interrupted", file=sys.stderr)
        return 130
    except _Terminated:
        print("\nshardllama: terminated", file=sys.stderr)
        return 143
    except BrokenPipeError:
        # The reader went away (`| head`): not an error worth a traceback.
        sys.stderr.close()
        return 0


if __name__ == "__main__":
    sys.exit(main())
