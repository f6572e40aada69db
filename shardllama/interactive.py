"""Interactive mode (``--start-interactive``) and ``shardllama chat``: read a line, answer it, ask again.

Each turn is one request to the engine (``shardllama.engine``) whose prompt is the whole conversation so far;
the engine's prompt cache holds the previous turn's blocks, so the turn feeds only its new tokens (the
user's line and what surrounds it) and the history is never recomputed.

Behaviour (the place it is documented; the README should point here):

- A turn ends at a stop string (``--interactive-stop``, matched on the generated *text*), a stop token,
  ``--max-new-tokens`` or Ctrl-C.  Text that may be the start of a stop string is held back until it is
  known not to be one, so a stop string is never printed.  The context keeps exactly what was printed:
  the tokens that spelled the stop string are dropped from the sequence (re-fed text covers a token that
  was half before it), so with stop ``"\\nUser:"`` the prefix should bring its own ``"\\nUser: "``.
- Ctrl-C while the model writes ends the turn after the current token and asks again (what it wrote
  stays in the context); a second Ctrl-C before the turn has ended quits at once (exit code 130, workers
  stopped), for a pass that does not come back.  Ctrl-C or Ctrl-D (EOF) at the prompt ends the session with
  exit code 0.  This is llama.cpp's interactive mode.
- When the context (``--max-seq-len``) is full, one line says so on stderr and the session ends, exit 0.
- On a terminal, each generated token is coloured by its probability (``NO_COLOR`` turns that off);
  a ``> `` prompt goes to stderr when stdin is a terminal.
"""

from __future__ import annotations

import bisect
import contextlib
import dataclasses
import logging
import signal
import sys
import threading
from typing import Callable, Collection, TextIO

import torch

from .backend import Backend
from .engine import Engine, Failed, Finished, Request
from .errors import UsageError
from .sampling import SamplingParams
from .stops import StopScanner
from .tokenizer import Tokenizer

log = logging.getLogger(__name__)

# Probability buckets, most likely first: green, cyan, yellow, red (rllama coloured tokens the same way).
COLOURS = ((0.75, "\x1b[32m"), (0.5, "\x1b[36m"), (0.25, "\x1b[33m"), (0.0, "\x1b[31m"))
RESET = "\x1b[0m"


def colour_of(prob: float) -> str:
    return next(code for floor, code in COLOURS if prob >= floor)


class ContextFull(Exception):
    """The next turn does not fit in --max-seq-len; the session ends."""


@dataclasses.dataclass
class Turn:
    text: str  # what was printed
    tokens: list[int]  # the generated tokens kept in the sequence
    reason: str  # "stop-string", "end-token", "max-new-tokens", "context-full" or "interrupted"


class Printer:
    """Writes the model's text, each piece coloured by the probability of the token that completed it."""

    def __init__(self, out: TextIO, colour: bool):
        self.out, self.colour = out, colour

    def __call__(self, text: str, prob: float) -> None:
        if text:
            self.out.write(f"{colour_of(prob)}{text}{RESET}" if self.colour else text)
            self.out.flush()


@dataclasses.dataclass(frozen=True)
class TurnOptions:
    """How each turn ends and what surrounds the user's line: interactive mode's flags, and chat's."""

    max_new_tokens: int | None = None  # per turn; None: until a stop or the end of the context
    stop_strings: tuple[str, ...] = ()
    prefix: str = ""  # put before each line the user types
    postfix: str = ""  # and after it
    ignore_eos: bool = False  # keep generating past the end token
    echo: bool = True  # print the system prompt
    system_prompt: str | None = None


class Session:
    """One conversation, fed a turn at a time through an engine with a one-entry prompt cache."""

    def __init__(self, backend: Backend, tokenizer: Tokenizer, params: SamplingParams, *,
                 max_new_tokens: int | None = None, stop_strings: Collection[str] = (),
                 stop_ids: Collection[int] | None = None, generator: torch.Generator | None = None,
                 emit: Callable[[str, float], None] = lambda text, prob: None):
        self.backend, self.tok, self.params = backend, tokenizer, params
        self.max_new_tokens, self.stop_strings, self.generator, self.emit = max_new_tokens, stop_strings, generator, emit
        self.stop_ids = frozenset(tokenizer.stop_ids if stop_ids is None else stop_ids)
        self.engine = Engine(backend, cache_size=1)
        self.tokens: list[int] = []  # the conversation: the context of the next turn
        self.pending: list[int] = []  # fed with the next turn: text printed before a stop string, unfed
        self.interrupted = threading.Event()

    @property
    def room(self) -> int:
        """Tokens the context can still take."""
        return self.backend.max_seq_len - len(self.tokens) - len(self.pending)

    def reset(self) -> None:
        """Start over (what the cache holds is reused as far as the new tokens agree with it)."""
        self.tokens = []
        self.pending = []

    def turn(self, new_ids: list[int]) -> Turn:
        """Feed ``new_ids`` and generate the model's answer, printing it through ``emit``."""
        new_ids = self.pending + new_ids
        if len(new_ids) >= self.room + len(self.pending):  # leave room for at least one generated token
            raise ContextFull()
        self.pending = []
        start = len(self.tokens) + len(new_ids)  # where the generated tokens begin
        scanner, stream = StopScanner(self.stop_strings), self.tok.stream()
        ends: list[int] = []  # ends[i]: length of the turn's text once token i was decoded
        reason, prob = "max-new-tokens", 1.0
        if new_ids:  # the decoder's context: a turn's first piece keeps its leading space (SentencePiece)
            stream.push(new_ids[-1])
        max_len = self.backend.max_seq_len
        request = Request(prompt=self.tokens + new_ids, params=self.params, emit=lambda event: None,
                          max_new_tokens=max_len if self.max_new_tokens is None else self.max_new_tokens,
                          max_len=max_len, stop_ids=self.stop_ids, generator=self.generator)
        self.interrupted.clear()
        with _sigint_sets(self.interrupted):
            for event in self.engine.run(request):
                if isinstance(event, Failed):
                    raise event.error
                if isinstance(event, Finished):
                    break
                if event.is_end:
                    reason = "end-token"
                    break
                prob = event.prob
                self.emit(scanner.push(stream.push(event.id)), prob)
                ends.append(len(scanner.text))
                if scanner.stop_at is not None:
                    reason = "stop-string"
                    break
                if self.interrupted.is_set():
                    reason = "interrupted"
                    break
            else:
                if len(request.tokens) >= max_len:
                    reason = "context-full"
        self.tokens = request.tokens
        if scanner.stop_at is None:
            self.emit(scanner.push(stream.flush()) + scanner.finish(), prob)
        else:
            self._drop_stop_string(start, ends, scanner)
        return Turn(scanner.text[:scanner.printed], self.tokens[start:], reason)

    def _drop_stop_string(self, start: int, ends: list[int], scanner: StopScanner) -> None:
        """Cut the sequence back to the tokens wholly before the stop string; the printed text of a token
        that straddles it is fed again with the next turn."""
        keep = bisect.bisect_right(ends, scanner.stop_at)
        del self.tokens[start + keep:]
        rest = scanner.text[ends[keep - 1] if keep else 0:scanner.stop_at]
        self.pending = self.tok.encode(rest, bos=False, special=False) if rest else []


@contextlib.contextmanager
def _sigint_sets(flag: threading.Event):
    """While generating, the first Ctrl-C sets ``flag`` (the turn ends after this token) instead of raising,
    so a forward pass on the workers is never cut in half; a second one raises KeyboardInterrupt."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def on_sigint(signum, frame):
        if flag.is_set():
            raise KeyboardInterrupt
        flag.set()

    previous = signal.signal(signal.SIGINT, on_sigint)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


def read_line(stdin: TextIO, stderr: TextIO, marker: str = "> ") -> str | None:
    """The user's next line without its newline; None at EOF or Ctrl-C."""
    if stdin.isatty():
        stderr.write(marker)
        stderr.flush()
    try:
        line = stdin.readline()
    except KeyboardInterrupt:
        return None
    if not line:
        return None
    return line[:-1] if line.endswith("\n") else line


def _generator(seed: int | None) -> torch.Generator | None:
    return torch.Generator().manual_seed(seed) if seed is not None else None


def _context_full(stderr: TextIO, session: Session) -> int:
    stderr.write(f"shardllama: the context is full (--max-seq-len {session.backend.max_seq_len} tokens); "
                 "ending the session\n")
    stderr.flush()
    return 0


def run_interactive(model, params: SamplingParams, seed: int | None, options: TurnOptions, *, colour: bool,
                    stdin: TextIO = sys.stdin, stdout: TextIO = sys.stdout, stderr: TextIO = sys.stderr) -> int:
    """rllama's ``--start-interactive``: plain text, prefix + line + postfix per turn."""
    tok = model.tokenizer
    session = Session(model.backend, tok, params, max_new_tokens=options.max_new_tokens,
                      stop_strings=options.stop_strings, stop_ids=() if options.ignore_eos else None,
                      generator=_generator(seed), emit=Printer(stdout, colour))
    if options.system_prompt:
        session.pending = tok.encode(options.system_prompt, special=True)
        if options.echo:
            stdout.write(options.system_prompt)
            stdout.flush()
    elif tok.add_bos:
        session.pending = tok.encode("")

    def turn(line: str) -> Turn:
        return session.turn(tok.encode(options.prefix, bos=False) + tok.encode(line, bos=False, special=False)
                            + tok.encode(options.postfix, bos=False))

    return _converse(turn, session, stdin, stdout, stderr)


def _converse(turn: Callable[[str], Turn], session: Session, stdin: TextIO, stdout: TextIO, stderr: TextIO) -> int:
    """Read a line, answer it, ask again, until EOF (exit 0) or a full context (a message, exit 0)."""
    while (line := read_line(stdin, stderr)) is not None:
        try:
            answer = turn(line)
        except ContextFull:
            return _context_full(stderr, session)
        stdout.write("\n")
        stdout.flush()
        if answer.reason == "context-full":
            return _context_full(stderr, session)
    return 0


class ChatSession:
    """The model's own chat template over a :class:`Session`: each turn renders the whole conversation and
    feeds only what is new since the text already in the cache."""

    def __init__(self, session: Session, system_prompt: str | None = None):
        self.session = session
        self.messages: list[dict[str, str]] = [{"role": "system", "content": system_prompt}] if system_prompt else []
        self.context_text = ""  # the rendering the sequence holds, as text
        self.recomputed = 0  # times a rendering did not extend the previous one

    def render(self, add_generation_prompt: bool = True) -> str:
        from .chat_template import render_for

        return render_for(self.session.tok, self.messages, add_generation_prompt=add_generation_prompt)

    def turn(self, line: str) -> Turn:
        self.messages.append({"role": "user", "content": line})
        text = self.render()
        if not text.startswith(self.context_text):
            log.debug("chat template: the new rendering does not extend the cached one; recomputing the conversation")
            self.recomputed += 1
            self.session.reset()
            self.context_text = ""
        ids = self._encode(text[len(self.context_text):], text, line)
        turn = self.session.turn(ids)
        content = self.session.tok.decode([t for t in turn.tokens if t not in self.session.stop_ids])
        self.messages.append({"role": "assistant", "content": content})
        end = turn.tokens[-1:] if turn.reason == "end-token" else []
        self.context_text = text + content + "".join(self.session.tok.token_text(t) for t in end)
        return turn

    def _encode(self, suffix: str, text: str, line: str) -> list[int]:
        """Ids of the new ``suffix`` of the rendering ``text``; the user's ``line`` in it is encoded as plain
        text (control tokens typed by the user stay characters), the template's own markup as markup."""
        tok = self.session.tok
        mark = "\x00shardllama-user-line\x00"
        self.messages[-1]["content"] = mark
        try:
            marked = self.render()
        finally:
            self.messages[-1]["content"] = line
        cut = len(text) - len(suffix)
        marked_suffix = marked[cut:] if marked[:cut] == text[:cut] else ""
        if marked_suffix.count(mark) == 1 and marked_suffix.replace(mark, line) == suffix:
            before, after = marked_suffix.split(mark)
            return (tok.encode(before, bos=False) + tok.encode(line, bos=False, special=False)
                    + tok.encode(after, bos=False))
        log.debug("chat template: cannot locate the user's line in the rendering; encoding it with the markup")
        return tok.encode(suffix, bos=False)


def run_chat(model, params: SamplingParams, seed: int | None, options: TurnOptions, *, colour: bool,
             stdin: TextIO = sys.stdin, stdout: TextIO = sys.stdout, stderr: TextIO = sys.stderr) -> int:
    """``shardllama chat``: the interactive loop with the model's chat template."""
    tok = model.tokenizer
    if not tok.chat_template:
        raise UsageError(f"{model.path}: the model has no chat template; "
                         "use `shardllama generate --start-interactive` with a prefix and postfix instead")
    session = Session(model.backend, tok, params, max_new_tokens=options.max_new_tokens, generator=_generator(seed),
                      emit=Printer(stdout, colour))
    return _converse(ChatSession(session, options.system_prompt).turn, session, stdin, stdout, stderr)
