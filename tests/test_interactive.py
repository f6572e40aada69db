"""Interactive mode and `shardllama chat`: the session logic on a tiny random model (counting what is fed
to the backend), and the real CLI on the demo model through a pipe and through a pty."""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import threading
import time

import pytest

from shardllama.backend import LocalBackend
from shardllama.kv_cache import blocks_for
from shardllama.chat_template import render
from shardllama.config import ModelArgs
from shardllama.errors import UsageError
from shardllama.interactive import ChatSession, Session, TurnOptions, run_chat
from shardllama.stops import StopScanner
from shardllama.model import random_weights
from shardllama.sampling import SamplingParams
from shardllama.tokenizer_files import load_tokenizer

GREEDY = SamplingParams(temperature=0)
FAST = ["--temperature", "0", "--max-seq-len", "256", "--workers", "0", "-q"]


class CountingBackend(LocalBackend):
    """Records (start, number of tokens) of every forward pass.  Its KV cache holds one context and one block
    more: what interactive mode opens (``runtime.start``)."""

    def __init__(self, *a, max_seq_len: int, **kw):
        super().__init__(*a, max_seq_len=max_seq_len, n_blocks=blocks_for(max_seq_len) + 1, **kw)
        self.calls: list[tuple[int, int]] = []

    def forward(self, tokens, start, tables, lengths=None, all_logits=False):
        self.calls.append((int(start[0]), tokens.shape[1]))
        return super().forward(tokens, start, tables, lengths, all_logits)


@pytest.fixture(scope="module")
def tok(demo_gguf):
    return load_tokenizer(demo_gguf)


@pytest.fixture
def backend(tok):
    args = ModelArgs(dim=32, n_layers=1, n_heads=2, n_kv_heads=1, vocab_size=tok.vocab_size, hidden_dim=64,
                     max_seq_len=256)
    return CountingBackend(args, random_weights(args, seed=3), max_seq_len=256)


def assert_fed_once(backend, session):
    """Every forward pass starts where the previous one ended: no token of the history is fed twice."""
    position = 0
    for start, n in backend.calls:
        assert start == position, backend.calls
        position += n
    assert position == len(session.tokens) - 1  # the last token is emitted, not yet fed


# --- the session logic


def test_stop_scanner_holds_back_a_possible_stop_and_never_prints_it():
    s = StopScanner(["\nUser:"])
    assert s.push("Hello") == "Hello"
    assert s.push(" there\nUs") == " there"  # "\nUs" may begin the stop string
    assert s.push("ually") == "\nUsually"
    assert s.push("\nUse") == ""
    assert s.push("r: hi") == "" and s.stop_at == len("Hello there\nUsually")
    assert s.text[:s.printed] == "Hello there\nUsually"
    t = StopScanner(["aab"])
    assert t.push("aa") == "" and t.push("a") == "a" and t.push("b") == "" and t.stop_at == 1
    u = StopScanner(["END"])
    assert u.push("xEN") == "x" and u.finish() == "EN"


def test_turns_continue_from_the_cache_with_prefix_and_postfix(tok, backend):
    session = Session(backend, tok, GREEDY, max_new_tokens=5)
    session.pending = tok.encode("System.\n")
    expected = list(session.pending)
    for line in ["hello", "<|im_end|> typed", "bye"]:
        ids = tok.encode("User: ", bos=False) + tok.encode(line, bos=False, special=False) + tok.encode("\nAI:", bos=False)
        before = len(session.tokens) + len(session.pending)
        turn = session.turn(ids)
        expected += ids
        assert session.tokens[before:before + len(ids)] == ids
        expected += turn.tokens
        assert turn.reason in ("max-new-tokens", "end-token")
    assert session.tokens == expected
    assert tok.encode("<|im_end|>", bos=False)[0] not in session.tokens  # typed text stays text
    assert_fed_once(backend, session)


def test_stop_string_ends_the_turn_and_is_neither_printed_nor_kept(tok, backend):
    printed = []
    free = Session(backend, tok, GREEDY, max_new_tokens=12, stop_ids=())
    full = free.turn(tok.encode("Once upon a time"))
    stop = full.text[4:7]
    assert len(full.text) > 8 and stop
    backend.calls.clear()
    session = Session(backend, tok, GREEDY, max_new_tokens=12, stop_ids=(), stop_strings=[stop],
                      emit=lambda text, prob: printed.append(text))
    turn = session.turn(tok.encode("Once upon a time"))
    assert turn.reason == "stop-string"
    assert turn.text == "".join(printed) == full.text[:full.text.find(stop)]
    # The context holds what was printed: kept tokens plus the re-fed remainder.
    assert tok.decode(turn.tokens) + tok.decode(session.pending) == turn.text
    session.turn(tok.encode(" more"))  # and goes on from there


def test_context_full_is_reported(tok, backend):
    session = Session(backend, tok, GREEDY, max_new_tokens=None, stop_ids=())
    turn = session.turn(tok.encode("word " * 50))
    assert turn.reason == "context-full" and len(session.tokens) == backend.max_seq_len + 1  # the last unfed
    from shardllama.interactive import ContextFull

    with pytest.raises(ContextFull):
        session.turn(tok.encode("more"))


def test_chat_session_feeds_only_the_new_suffix(tok, backend):
    session = Session(backend, tok, GREEDY, max_new_tokens=6)
    chat = ChatSession(session, "Be brief.")
    for line in ["Hi", "What is <|im_end|>?", "Bye"]:
        chat.turn(line)
    assert chat.recomputed == 0
    assert_fed_once(backend, session)
    # What the cache holds reads as the rendered conversation (the typed <|im_end|> stayed text).
    im_end = tok.encode("<|im_end|>", bos=False)
    assert session.tokens.count(im_end[0]) <= 2 * len(chat.messages)
    text = chat.render(add_generation_prompt=False)
    assert text.startswith(chat.context_text.rsplit("<|im_start|>assistant\n", 1)[0])


def test_chat_template_matches_transformers(demo_gguf, tok):
    transformers = pytest.importorskip("transformers")
    hf = transformers.AutoTokenizer.from_pretrained(demo_gguf.parent, gguf_file=demo_gguf.name)
    conversations = [
        [{"role": "user", "content": "Hi there"}, {"role": "assistant", "content": "Hello! How can I help?"},
         {"role": "user", "content": "Tell me a joke."}],
        [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "2+2?"},
         {"role": "assistant", "content": "4"}, {"role": "user", "content": "And 3+3?"}],
    ]
    for messages in conversations:
        for gen in (True, False):
            assert render(tok.chat_template, messages, add_generation_prompt=gen) == \
                hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=gen)


def test_chat_without_template_is_a_one_line_error(tok):
    class NoTemplate:
        chat_template = None

    model = argparse.Namespace(tokenizer=NoTemplate(), path="m.gguf", backend=None)
    with pytest.raises(UsageError, match="--start-interactive"):
        run_chat(model, GREEDY, None, TurnOptions(), colour=False)


# --- the real CLI on the demo model


def run_cli(*args, stdin="", env=None, timeout=300):
    return subprocess.run([sys.executable, "-m", "shardllama", *map(str, args)], input=stdin, capture_output=True,
                          text=True, timeout=timeout, env={**os.environ, **(env or {})})


def test_interactive_through_a_pipe_stop_prefix_postfix_eof(demo_gguf):
    flags = ["--model-path", demo_gguf, "--start-interactive", *FAST, "--max-new-tokens", "16", "--no-echo",
             "--interactive-system-prompt", "A conversation.\n", "--interactive-prompt-prefix", "User: ",
             "--interactive-prompt-postfix", "\nAssistant:"]
    free = run_cli(*flags, stdin="What is the capital of France?\n")
    assert free.returncode == 0, free.stderr
    answer = free.stdout[:-1]  # one turn, then a newline
    assert "\x1b[" not in free.stdout and len(answer) > 6
    stop = answer[3:6]
    stopped = run_cli(*flags, "--interactive-stop", stop, "--interactive-stop", "never appears",
                      stdin="What is the capital of France?\nThanks\n")
    assert stopped.returncode == 0, stopped.stderr
    assert stopped.stdout.startswith(answer[:answer.find(stop)] + "\n")
    assert stop not in stopped.stdout.split("\n")[0]
    eof = run_cli(*flags, stdin="")
    assert eof.returncode == 0 and eof.stdout == "" and "Traceback" not in eof.stderr


def test_interactive_context_full_message(demo_gguf):
    r = run_cli("--model-path", demo_gguf, "--start-interactive", *FAST[:2], "--workers", "1", "-q",
                "--max-seq-len", "48", "--ignore-eos", stdin="Tell me a long story about dragons.\nMore\nMore\n")
    assert r.returncode == 0, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "context is full" in lines[0] and "--max-seq-len 48" in lines[0]


def test_chat_answers_through_a_pipe(demo_gguf):
    r = run_cli("chat", "--model-path", demo_gguf, *FAST, "--max-new-tokens", "20",
                stdin="What is the capital of France?\nAnd of Germany?\n")
    assert r.returncode == 0, r.stderr
    first, second = r.stdout.splitlines()[:2]
    assert "Paris" in first and "Berlin" in second
    assert "\x1b[" not in r.stdout


@pytest.mark.parametrize("no_color", [False, True])
def test_colour_on_a_terminal_only_without_no_color(demo_gguf, no_color):
    pexpect = pytest.importorskip("pexpect")
    env = {k: v for k, v in os.environ.items() if k != "NO_COLOR"}
    if no_color:
        env["NO_COLOR"] = "1"
    child = pexpect.spawn(sys.executable, ["-m", "shardllama", "chat", "--model-path", str(demo_gguf), *FAST,
                                           "--max-new-tokens", "8"], env=env, encoding="utf-8", timeout=120)
    child.expect_exact("> ")  # the prompt marker: stdin is a terminal
    child.sendline("Hello")
    child.expect_exact("> ")
    output = child.before  # the echoed line and the answer
    child.sendeof()
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0
    assert ("\x1b[3" in output) != no_color


# --- Ctrl-C on a terminal


def test_the_first_ctrl_c_sets_the_flag_the_second_raises():
    from shardllama.interactive import _sigint_sets

    flag = threading.Event()
    with _sigint_sets(flag):
        os.kill(os.getpid(), signal.SIGINT)
        assert flag.wait(5)  # the answer ends after this token; nothing raised
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(5)  # (the handler runs between bytecodes: at once)
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def spawn_interactive(pexpect, demo_gguf, *flags):
    """`shardllama --start-interactive` on 2 workers in a pseudo-terminal, at its first prompt; and its workers."""
    import psutil

    child = pexpect.spawn(sys.executable, ["-m", "shardllama", "--model-path", str(demo_gguf), "--start-interactive",
                                           "--temperature", "0", "--max-seq-len", "1024", "--workers", "2", "-q",
                                           "--ignore-eos", *flags],
                          env={**os.environ, "NO_COLOR": "1"}, encoding="utf-8", timeout=120)
    child.expect_exact("> ")
    workers = [p for p in psutil.Process(child.pid).children() if "workers" in " ".join(p.cmdline())]
    assert len(workers) == 2
    return child, workers


def assert_nothing_left(child, workers):
    import psutil

    from tests.test_cli import shm_segments

    _, still_running = psutil.wait_procs(workers, timeout=10)
    assert not still_running
    assert not [n for n in shm_segments() if f"-{child.pid}-" in n]
    assert "Traceback" not in child.before and "leaked" not in child.before


def test_ctrl_c_ends_the_answer_and_returns_to_the_prompt(demo_gguf):
    pexpect = pytest.importorskip("pexpect")
    child, workers = spawn_interactive(pexpect, demo_gguf, "--max-new-tokens", "900")
    try:
        for line in ["Tell me a very long story about dragons.", "Go on."]:
            child.sendline(line)
            child.expect_exact(line + "\r\n")  # the terminal's echo
            child.expect(r"\w{3}")  # the answer is being written: 900 tokens would take a while
            child.sendintr()
            child.expect_exact("\r\n> ", timeout=30)  # back at the prompt, after at most a token or two
            assert len(child.before) < 100, child.before
            assert all(w.is_running() for w in workers)  # the session goes on, on the same workers
        child.sendintr()  # Ctrl-C at the prompt ends the session
        child.expect(pexpect.EOF, timeout=30)
    finally:
        child.close(force=True)
    assert child.exitstatus == 0, child.before
    assert_nothing_left(child, workers)


def test_a_second_ctrl_c_during_an_answer_quits(demo_gguf):
    pexpect = pytest.importorskip("pexpect")
    child, workers = spawn_interactive(pexpect, demo_gguf, "--max-new-tokens", "100")
    try:
        # ~770 tokens to prefill: the forward pass takes a second or more, so both Ctrl-C land inside it.
        line = " ".join(["the dragon flew over the mountain"] * 110)
        child.sendline(line)
        child.expect_exact("mountain\r\n")
        time.sleep(0.5)  # the line has been read and is being fed
        child.sendintr()
        time.sleep(0.2)  # two signals, not one coalesced
        child.sendintr()
        child.expect(pexpect.EOF, timeout=30)
    finally:
        child.close(force=True)
    assert child.exitstatus == 130 and "shardllama: interrupted" in child.before, child.before
    assert_nothing_left(child, workers)
