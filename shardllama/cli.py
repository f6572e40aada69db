"""The ``shardllama`` command.

``shardllama [generate] --prompt ...`` streams a continuation to stdout and prints timings to stderr.
Every user mistake ends in one line on stderr and exit code 1 (2 for usage errors), never a traceback.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
from typing import Sequence

from .errors import PromptTooLongError, ShardllamaError, UsageError
from .phases import Phases
from . import cli_common, flags

log = logging.getLogger("shardllama")

SUBCOMMANDS = ("generate", "chat", "serve", "worker", "shards", "keys")


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


def _progress(args: argparse.Namespace) -> bool:
    return not getattr(args, "quiet", False) and sys.stderr.isatty()


def cmd_serve(args: argparse.Namespace) -> int:
    """``shardllama serve`` / ``--inference-server``: check the server flags, bind the port, then open the model
    with the KV-cache blocks they ask for (sized from the checkpoint's headers) and serve."""
    from .server import serve

    config = flags.server_config(args)  # a bad value fails now, not after the model loads
    runtime = flags.runtime_config(args)

    # Workers forked before the HTTP thread exists (launch forks only a single-threaded process); the
    # coordinator takes them in load(), and the context ends any it did not.
    with runtime.early_workers() as local_workers:
        def load():
            with runtime.prepare(progress=_progress(args)) as prepared:
                from .launch import default_workers
                from .kv_cache import BLOCK_SIZE

                n_workers = runtime.workers if runtime.workers is not None else default_workers(prepared.args,
                                                                                                 prepared.dtype)
                n_blocks = config.kv_blocks(prepared.max_seq_len, prepared.kv_bytes_per_token(n_workers), BLOCK_SIZE)
                try:
                    return runtime.start(prepared, n_blocks=n_blocks, progress=_progress(args),
                                         local_workers=local_workers)
                finally:
                    if local_workers is not None:
                        local_workers.close()  # those the coordinator did not take

        return serve(config, load)


def _colour() -> bool:
    return sys.stdout.isatty() and not os.environ.get("NO_COLOR")


def cmd_chat(args: argparse.Namespace) -> int:
    from .interactive import run_chat

    params, seed = flags.sampling(args)
    options = flags.interactive_options(args, args.system_prompt)
    with flags.runtime_config(args).open(progress=_progress(args)) as model:
        flags.check_vocab(params, model.args.vocab_size)
        return run_chat(model, params, seed, options, colour=_colour())


def cmd_generate(args: argparse.Namespace) -> int:
    if args.inference_server:  # rllama's spelling of `shardllama serve`
        return cmd_serve(args)
    if args.start_interactive:
        from .interactive import run_interactive

        system = args.interactive_system_prompt
        if system is None and (args.prompt is not None or args.prompt_file is not None):
            system = _read_prompt(args)
        params, seed = flags.sampling(args)
        with flags.runtime_config(args).open(progress=_progress(args)) as model:
            flags.check_vocab(params, model.args.vocab_size)
            return run_interactive(model, params, seed, flags.interactive_options(args, system), colour=_colour())
    phases = Phases.from_process_start()  # the command's start-up, up to the first token
    prompt = _read_prompt(args)
    progress = _progress(args)
    import torch

    from .engine import Engine, Failed, Finished, Request

    params, seed = flags.sampling(args)
    runtime = flags.runtime_config(args)
    phases.until_now("python and imports")
    with runtime.early_workers(phases) as local_workers:
        with phases("model header and tokenizer"):
            prepared = runtime.prepare(progress=progress)
        with prepared:
            flags.check_vocab(params, prepared.args.vocab_size)  # before a single weight is read
            with phases("tokenize the prompt"):
                prompt_ids = prepared.tokenizer.encode(prompt)
            if len(prompt_ids) > prepared.max_seq_len:  # checked before a single weight is read
                raise PromptTooLongError(f"prompt is {len(prompt_ids)} tokens, longer than --max-seq-len "
                                         f"{prepared.max_seq_len}")
            model = runtime.start(prepared, progress=progress, phases=phases, local_workers=local_workers)
    startup_s = stats = None
    with model:
        tok = model.tokenizer
        out = sys.stdout
        if not args.no_echo:
            out.write(prompt)
            out.flush()
        stream = tok.stream()
        request = Request(prompt=prompt_ids, params=params, emit=lambda event: None,
                          max_new_tokens=model.backend.max_seq_len if args.max_new_tokens is None else args.max_new_tokens,
                          max_len=model.backend.max_seq_len,
                          stop_ids=frozenset() if args.ignore_eos else frozenset(tok.stop_ids),
                          generator=torch.Generator().manual_seed(seed) if seed is not None else None)
        for event in Engine(model.backend).run(request):
            if isinstance(event, Failed):
                raise event.error
            if isinstance(event, Finished):  # nothing to generate (--max-new-tokens 0)
                stats = event.stats
                break
            if startup_s is None:
                startup_s = phases.elapsed()
                phases.add("prefill and first token", request.first_token_s)
            if event.last:
                stats = event.stats
            if event.is_end:
                break
            text = stream.push(event.id)
            if text:
                out.write(text)
                out.flush()
        out.write(stream.flush() + "\n")
        out.flush()
        if not args.quiet and stats is not None:
            _print_stats(stats, startup_s)
        if args.verbose and startup_s is not None:
            print("\n".join(phases.lines(startup_s)), file=sys.stderr)
    return 0


def cmd_worker(args: argparse.Namespace) -> int:
    from workers import main as worker_main

    return worker_main(args.worker_argv, prog="shardllama worker")


def cmd_shards(args: argparse.Namespace) -> int:
    from .shm import clean, list_kept

    if args.action == "clean":  # never asks: only this user's sets go, and what stays is said, with why
        done = clean(args.key)
        print(f"removed {len(done.removed)} shared-memory segment(s)")
        groups: dict[str, int] = {}
        for info, reason in done.skipped:
            if reason.startswith("owned by uid") and _user_name(info.uid):
                reason = f"{reason} (user {_user_name(info.uid)})"
            groups[reason] = groups.get(reason, 0) + 1
        for reason, n in groups.items():
            print(f"skipped {n} set{'' if n == 1 else 's'} {reason}")
        if groups:
            print("(`shardllama shards list` shows them; only their owner can remove another user's sets)")
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


def _user_name(uid: int) -> str | None:
    import pwd

    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return None


def _user(uid: int) -> str:
    name = _user_name(uid)
    return f"uid {uid}" if name is None else f"user {name} (uid {uid})"


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
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv:  # a new user's first try: the help, not an error (`shardllama --prompt ...` still generates)
        flags.build_parser().print_help()
        return 0
    try:
        args = flags.parse_args(argv)
        if args.command != "worker":  # the worker sets up its own logging from its own flags
            cli_common.setup_logging(cli_common.log_level(args), "shardllama: %(message)s")
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
