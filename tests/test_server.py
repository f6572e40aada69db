"""The inference server end to end: a real server in a subprocess on a free loopback port, real HTTP clients.

The main server runs the demo model on two workers (the tensor-parallel engine), with a small context
(64) and small limits (2 concurrent generations, 1 waiting, 4 prompt-cache entries) so that every limit
is reachable in a few tokens.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import requests
from hypothesis import HealthCheck, given, settings, strategies as st

from shardllama.loading import open_checkpoint
from shardllama.tokenizer_files import load_tokenizer

ROOT = Path(__file__).resolve().parents[1]
API = "/rllama/v1/inference"

# serve() on a model opened here, as a program embedding the server would.
LAUNCHER = """
import json, logging, sys
from shardllama.kv_cache import BLOCK_SIZE
from shardllama.runtime import RuntimeConfig
from shardllama.server import serve
from shardllama.server.config import ServerConfig
cfg = json.loads(sys.argv[1])
logging.basicConfig(level=logging.WARNING, format="shardllama: %(message)s")
config = ServerConfig(host="127.0.0.1", port=0, **cfg["serve"])
runtime = RuntimeConfig(model_path=cfg["model"], max_seq_len=cfg["max_seq_len"], workers=cfg["workers"],
                        dtype=cfg.get("dtype", "f32"))  # f32: the golden text
def load():
    with runtime.prepare() as prepared:
        n_blocks = config.kv_blocks(prepared.max_seq_len, prepared.kv_bytes_per_token(cfg["workers"]), BLOCK_SIZE)
        return runtime.start(prepared, n_blocks=n_blocks)
sys.exit(serve(config, load))
"""

# The command-line route: `shardllama --inference-server` (rllama's spelling of `shardllama serve`).
CLI_LAUNCHER = """
import sys
from shardllama.cli import main
sys.exit(main(["--inference-server", *sys.argv[1:]]))
"""


class Server:
    """``serve()`` in a subprocess on port 0 (the OS picks a free one); the port is read from its
    "serving ..." line (``ready``: the text of the line to wait for; "listening on" is printed before the
    model loads).  stderr is drained by a thread so the pipe never fills."""

    def __init__(self, code: str, *argv: str, ready: str = "serving POST"):
        self.ready = ready
        self.proc = subprocess.Popen([sys.executable, "-c", code, *argv], cwd=ROOT, stdin=subprocess.DEVNULL,
                                     stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        self.lines: list[str] = []
        self._ready = threading.Event()
        threading.Thread(target=self._drain, daemon=True).start()
        if not self._ready.wait(120) or self.proc.poll() is not None:
            self.stop()
            raise RuntimeError("the server did not start:\n" + "".join(self.lines))
        port = int(re.search(r"http://127\.0\.0\.1:(\d+)/", "".join(self.lines)).group(1))
        self.base = f"http://127.0.0.1:{port}"
        self.url = self.base + API

    def _drain(self) -> None:
        for line in self.proc.stderr:
            self.lines.append(line)
            if self.ready in line:
                self._ready.set()
        self._ready.set()

    def post(self, body, **kw) -> requests.Response:
        """POST ``body`` (bytes, text, or an object sent as JSON), declared as JSON unless ``headers`` say else."""
        if not isinstance(body, (bytes, str)):
            body = json.dumps(body)
        kw.setdefault("headers", {"Content-Type": "application/json"})
        return requests.post(self.url, data=body, timeout=60, **kw)

    def generate(self, **body) -> list[dict]:
        r = self.post(body)
        assert r.status_code == 200, r.text
        return [json.loads(line) for line in r.text.splitlines()]

    def stats(self) -> dict:
        return requests.get(self.base + "/rllama/v1/stats", timeout=10).json()

    def wait_idle(self, timeout: float = 20) -> dict:
        deadline = time.monotonic() + timeout
        while True:
            s = self.stats()
            if s["running"] == 0 and s["waiting"] == 0:
                return s
            assert time.monotonic() < deadline, s
            time.sleep(0.02)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def serving(model, *, workers: int, max_seq_len: int, max_concurrent: int, max_queue: int, cache: int):
    """A module fixture's body: a server on ``model`` for the tests, then a check that it stopped cleanly."""
    cfg = {"model": str(model), "workers": workers, "max_seq_len": max_seq_len,
           "serve": {"max_concurrent": max_concurrent, "max_queue": max_queue, "prompt_cache_size": cache}}
    s = Server(LAUNCHER, json.dumps(cfg))
    yield s
    s.stop()
    log = "".join(s.lines)
    assert s.proc.returncode == 0, log  # SIGTERM is a clean stop
    assert "Traceback" not in log and "internal error" not in log, log


def gguf_tokenizer(path):
    with open_checkpoint(path) as ckpt:
        return load_tokenizer(path, gguf_fields=ckpt.gguf_fields)


def openai_client(server: Server, timeout: float = 60):
    import openai

    return openai.OpenAI(base_url=server.base + "/v1", api_key="x", max_retries=0, timeout=timeout)


@pytest.fixture(scope="module")
def server(demo_gguf):
    yield from serving(demo_gguf, workers=2, max_seq_len=64, max_concurrent=2, max_queue=1, cache=4)


@pytest.fixture(scope="module")
def tokenizer(demo_gguf):
    return gguf_tokenizer(demo_gguf)


def entry(line: dict) -> tuple[str, dict]:
    assert len(line) == 1, line
    return next(iter(line.items()))


# ---- format and streaming ------------------------------------------------------------------------------


def test_jsonl_lines_concatenate_to_the_generated_text(server, tokenizer):
    r = server.post({"prompt": "The meaning of life is", "temperature": 0, "max_new_tokens": 8})
    assert r.status_code == 200 and r.headers["Content-Type"].startswith("text/jsonl")
    lines = [json.loads(line) for line in r.text.splitlines()]
    assert len(lines) == 8
    for line in lines:
        _, e = entry(line)
        assert e["p"] == 1.0 and isinstance(e["id"], int)  # greedy: probability 1 under the settings
        assert "is_end_token" not in e
    text = "".join(entry(line)[0] for line in lines)
    ids = [entry(line)[1]["id"] for line in lines]
    assert text == tokenizer.decode(ids) == " not just a random choice, but a"
    assert entry(lines[-1])[1]["generated"] == 8 and entry(lines[-1])[1]["prompt_tokens"] == 5


def test_a_split_character_appears_once_complete(server, tokenizer):
    # 🎉 is three byte-level tokens in this vocabulary; greedy continues the pattern.  Every token gets its
    # line at once; the character is the key of the token that completes it.
    lines = server.generate(prompt="🎉🎉🎉🎉🎉", temperature=0, max_new_tokens=6)
    assert [entry(x)[0] for x in lines] == ["", "", "🎉", "", "", "🎉"]
    # Sampled text wanders anywhere; the keys still join to exactly the decoded ids, also when the last
    # token stops halfway through a character (its line then carries what the decoder had held back).
    lines = server.generate(prompt="Emoji: 🎉🙂 and Chinese: 你好", temperature=2.0, top_k=1000, seed=7,
                            max_new_tokens=24, stop_at_end_token=False)
    assert len(lines) == 24
    assert "".join(entry(x)[0] for x in lines) == tokenizer.decode([entry(x)[1]["id"] for x in lines])
    lines = server.generate(prompt="🎉🎉🎉🎉🎉", temperature=0, max_new_tokens=2)
    ids = [entry(x)[1]["id"] for x in lines]  # the first two of 🎉's three bytes
    assert "".join(entry(x)[0] for x in lines) == tokenizer.decode(ids) == "\ufffd"


def test_the_first_line_arrives_while_the_generation_runs(server):
    with requests.post(server.url, json={"prompt": "Once upon a time", "temperature": 0, "max_new_tokens": 40},
                       stream=True, timeout=60) as r:
        lines = r.iter_lines()
        first = json.loads(next(lines))
        assert server.stats()["running"] == 1  # 39 tokens still to come
        rest = [json.loads(x) for x in lines]
    assert len(rest) == 39 and entry(first)[0]


def test_end_token_line(server):
    # A chat-formatted prompt makes the instruct model end its turn quickly.
    prompt = "<|im_start|>user\nSay OK.<|im_end|>\n<|im_start|>assistant\n"
    lines = server.generate(prompt=prompt, temperature=0, max_new_tokens=30)
    text, last = entry(lines[-1])
    assert last["is_end_token"] is True and text == "" and len(lines) < 30
    assert all("is_end_token" not in entry(x)[1] for x in lines[:-1])


def test_no_token_sampling_gives_the_whole_distribution(server, tokenizer):
    [line] = server.generate(prompt="The capital of France is", max_new_tokens=1, no_token_sampling=True,
                             temperature=0)
    assert sum(e["p"] for e in line.values()) == pytest.approx(1.0, abs=1e-9)
    assert len(line) > 40_000 and all(0 <= e["p"] <= 1 for e in line.values())
    chosen = [(text, e) for text, e in line.items() if e.get("chosen")]
    assert len(chosen) == 1
    text, e = chosen[0]
    assert text == tokenizer.token_text(e["id"]) and e["p"] == max(x["p"] for x in line.values())
    assert line[tokenizer.token_text(tokenizer.eos_id)]["is_end_token"] is True


# ---- bad input --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("body, fragment", [
    (b"{not json", "invalid JSON"),
    (b"", "empty"),
    (b"\xff\xfe", "UTF-8"),
    (b"[1, 2]", "JSON object"),
    ({}, '"prompt" is required'),
    ({"prompt": None}, '"prompt" is required'),
    ({"prompt": 5}, '"prompt" must be a string'),
    (b'{"prompt": "\\ud800"}', '"prompt" is not valid Unicode'),
    (b'{"prompt": "x", "junk": {"a\\udfff": 1}}', 'a key in "junk" is not valid Unicode'),
    (b'{"prompt": "x", "junk": ' + b"1" * 5000 + b"}", "invalid JSON: an integer of more than 4300 digits"),
    ({"prompt": "x", "temperature": 10**400}, '"temperature" must be a finite number, got an integer of 401 digits'),
    ({"prompt": "x", "top_p": -(10**400)}, '"top_p" must be a finite number'),
    ({"prompt": "x", "top_k": -(10**400)}, '"top_k" must be >= 1, got an integer of 401 digits'),
    ({"prompt": "x", "top_k": 0}, '"top_k" must be >= 1'),
    ({"prompt": "x", "top_k": "5"}, '"top_k" must be an integer'),
    ({"prompt": "x", "top_k": 2.5}, '"top_k" must be an integer'),
    ({"prompt": "x", "temperature": -1}, '"temperature"'),
    ({"prompt": "x", "temperature": "hot"}, '"temperature" must be a number'),
    ({"prompt": "x", "top_p": 0}, '"top_p" must be in (0, 1]'),
    ({"prompt": "x", "top_p": 1.5}, '"top_p" must be in (0, 1]'),
    ({"prompt": "x", "repetition_penalty": 0}, '"repetition_penalty"'),
    ({"prompt": "x", "max_new_tokens": -1}, '"max_new_tokens" must be >= 0'),
    ({"prompt": "x", "max_new_tokens": True}, '"max_new_tokens" must be an integer'),
    ({"prompt": "x", "max_seq_len": 0}, '"max_seq_len" must be >= 1'),
    ({"prompt": "x", "stop_at_end_token": "yes"}, '"stop_at_end_token" must be true or false'),
    ({"prompt": "x", "no_token_sampling": 1}, '"no_token_sampling" must be true or false'),
    ({"prompt": "one two three four five six", "max_seq_len": 3}, "longer than max_seq_len 3"),
    ({"prompt": "word " * 100}, "longer than the server's --max-seq-len 64"),
    (b'{"prompt": "' + b"x" * (2 << 20) + b'"}', "larger than the limit"),
])
def test_bad_requests_get_400_naming_the_problem(server, body, fragment):
    r = server.post(body)
    assert r.status_code == 400, r.text
    assert fragment in r.json()["error"]


@pytest.mark.parametrize("extreme", [
    {"top_p": 1e-300}, {"temperature": 1e-300, "repetition_penalty": 1e-300}, {"repetition_penalty": 1e300},
    {"temperature": 1e6, "top_k": 2**70}, {"max_seq_len": 2**70, "seed": 2**64 - 1}, {"temperature": None},
])
def test_extreme_but_valid_settings_generate(server, extreme):
    [line] = server.generate(prompt="Hello", max_new_tokens=1, **extreme)
    assert 0 < entry(line)[1]["p"] <= 1


def test_wrong_path_and_method(server):
    r = requests.post(server.base + "/v2/nothing", json={"prompt": "x"}, timeout=10)
    assert r.status_code == 404 and "no such path" in r.json()["error"]
    r = requests.get(server.url, timeout=10)
    assert r.status_code == 405 and "POST" in r.json()["error"] and r.headers["Allow"] == "POST"


@pytest.mark.parametrize("ctype", [
    None,  # what `curl -d` without -H and a bare urllib request send: nothing, or...
    "application/x-www-form-urlencoded",  # ...this; with text/plain and multipart: what a cross-site form posts
    "text/plain", "text/plain; charset=utf-8", "multipart/form-data; boundary=x", "text/jsonl", "text/html",
    "application/json; charset=latin-1",
])
def test_a_body_not_declared_json_gets_415(server, ctype):
    body = b'{"prompt": "Hi", "max_new_tokens": 1}'
    r = requests.post(server.url, data=body, headers={"Content-Type": ctype} if ctype else {}, timeout=10)
    assert r.status_code == 415, r.text
    assert "application/json" in r.json()["error"] or "UTF-8" in r.json()["error"]
    for ok in ("application/json", "application/json; charset=utf-8", "Application/JSON"):
        r = requests.post(server.url, data=body, headers={"Content-Type": ok}, timeout=10)
        assert r.status_code == 200 and len(r.text.splitlines()) == 1


settings.register_profile("server", max_examples=40, deadline=None,
                          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
FIELDS = ["prompt", "temperature", "top_k", "top_p", "repetition_penalty", "stop_at_end_token", "max_seq_len",
          "max_new_tokens", "no_token_sampling", "seed", "top_probs", "junk"]
LONE_SURROGATES = st.sampled_from(["\ud800", "a\udfff", "\udbff\ud800b"])  # json.dumps writes "\\ud800"
HUGE_INTEGERS = st.integers(300, 4000).map(lambda digits: 10**digits) | st.integers(300, 4000).map(lambda d: -(10**d))
JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats(allow_nan=True) | st.text(max_size=20)
    | LONE_SURROGATES | HUGE_INTEGERS,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3),
    max_leaves=6,
)
IN_RANGE = {  # values the server accepts, edges included, so that many bodies start a generation
    "temperature": st.sampled_from([0, 1e-300, 1e6]) | st.floats(0, 5),
    "top_k": st.integers(1, 2**70),
    "top_p": st.floats(1e-300, 1.0),
    "repetition_penalty": st.sampled_from([1e-300, 1e300]) | st.floats(0.5, 2),
    "stop_at_end_token": st.booleans(),
    "max_seq_len": st.integers(1, 2**70),
    "no_token_sampling": st.booleans(),
    "seed": st.integers(0, 2**64 - 1),
    "top_probs": st.integers(0, 20),
}
BODIES = st.one_of(
    st.fixed_dictionaries({"prompt": st.text(max_size=30), "max_new_tokens": st.integers(0, 3)}, optional=IN_RANGE)
    .map(json.dumps),
    st.dictionaries(st.sampled_from(FIELDS), JSON_VALUES, max_size=6).map(json.dumps),
    st.fixed_dictionaries({"prompt": st.text(max_size=30)}, optional={f: JSON_VALUES for f in FIELDS[1:]})
    .map(json.dumps),
    st.binary(max_size=60),
    # Integers past Python's 4300-digit conversion limit cannot come from json.dumps: written by hand.
    st.builds(lambda field, digits: f'{{"prompt": "x", "{field}": {"9" * digits}}}', st.sampled_from(FIELDS),
              st.integers(4000, 6000)),
)
JSON = ["application/json", "application/json; charset=utf-8"]
NOT_JSON = ["text/jsonl", "text/plain", "application/x-www-form-urlencoded", "multipart/form-data; boundary=x",
            "image/png", "application/json; charset=latin-1", None]


@settings(settings.get_profile("server"))
@given(body=BODIES, ctype=st.sampled_from(JSON * 3 + NOT_JSON))
def test_fuzzed_bodies_never_get_a_5xx(server, body, ctype):
    # A valid body starts a generation: the answer's status comes with its first token, then the client
    # hangs up and the server must drop the generation.
    headers = {"Content-Type": ctype} if ctype else {}
    with requests.post(server.url, data=body, headers=headers, stream=True, timeout=60) as r:
        assert r.status_code < 500, r.content[:300]
        assert r.status_code == 415 if ctype not in JSON else r.status_code != 415
        if r.status_code != 200:
            assert isinstance(r.json()["error"], str)
    server.wait_idle()
    assert server.proc.poll() is None


# ---- concurrency, disconnects, cache ---------------------------------------------------------------------


class Streamer(threading.Thread):
    """A client that reads a long generation line by line until told to hang up."""

    def __init__(self, server: Server, prompt: str):
        super().__init__(daemon=True)
        self.server, self.prompt = server, prompt
        self.lines: list[dict] = []
        self.status: int | None = None
        self.hang_up = threading.Event()

    def run(self) -> None:
        body = {"prompt": self.prompt, "max_new_tokens": 55, "temperature": 0}
        with requests.post(self.server.url, json=body, stream=True, timeout=60) as r:
            self.status = r.status_code
            for line in r.iter_lines():
                self.lines.append(json.loads(line))
                if self.hang_up.is_set():
                    break


def wait_for(predicate, timeout: float = 20):
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


def test_concurrency_limit_queue_and_503(server):
    before = server.wait_idle()
    clients = [Streamer(server, p) for p in ("Once upon a time", "The history of Rome", "A recipe for bread")]
    for c in clients:
        c.start()
    try:
        wait_for(lambda: (s := server.stats())["running"] == 2 and s["waiting"] == 1)
        r = server.post({"prompt": "one too many", "max_new_tokens": 1})
        assert r.status_code == 503 and "busy" in r.json()["error"] and r.headers["Retry-After"] == "1"
        wait_for(lambda: sum(len(c.lines) >= 2 for c in clients) == 2)
        waiting = [c for c in clients if not c.lines]  # whichever arrived last
        assert len(waiting) == 1
        now = server.stats()  # the two running ones decode together: more rows than passes
        assert now["decode_rows"] - before["decode_rows"] > now["decode_passes"] - before["decode_passes"]
    finally:
        for c in clients:
            c.hang_up.set()
    for c in clients:  # the hang-ups free both places: the waiting one runs, then hangs up too
        c.join(30)
    assert waiting[0].status == 200 and waiting[0].lines
    s = server.wait_idle()
    assert s["cancelled"] >= 3


def test_a_client_that_disconnects_stops_its_generation(server):
    server.wait_idle()
    before = server.stats()
    with requests.post(server.url, json={"prompt": "Tell me a long story", "max_new_tokens": 55, "temperature": 0},
                       stream=True, timeout=60) as r:
        next(r.iter_lines())
    s = server.wait_idle(timeout=5)  # well before 54 more tokens could have been made
    assert s["cancelled"] == before["cancelled"] + 1
    assert s["generated"] - before["generated"] < 20


def test_batched_greedy_equals_one_at_a_time(server):
    prompts = ["The best way to learn", "My favourite colour is", "In 1969, the first"]
    alone = [[entry(x)[1]["id"] for x in server.generate(prompt=p, temperature=0, max_new_tokens=10)]
             for p in prompts]
    together: list = [None] * 3

    def run(i):
        together[i] = [entry(x)[1]["id"] for x in server.generate(prompt=prompts[i], temperature=0, max_new_tokens=10)]

    threads = [threading.Thread(target=run, args=(i,)) for i in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert together == alone


def test_prompt_cache_reuses_prompts_and_their_continuations(server, tokenizer):
    prompt = "Prompt caching saves work: the cat sat on the"
    n = len(tokenizer.encode(prompt))
    first = server.generate(prompt=prompt, temperature=0, max_new_tokens=6)
    stats = entry(first[-1])[1]
    assert stats["cached_tokens"] == 0 and stats["computed_tokens"] == stats["prompt_tokens"] == n
    # The same prompt: only its last token is fed again.
    again = server.generate(prompt=prompt, temperature=0, max_new_tokens=6)
    stats = entry(again[-1])[1]
    assert stats["cached_tokens"] == n - 1 and stats["computed_tokens"] == 1
    assert [entry(x)[1]["id"] for x in again] == [entry(x)[1]["id"] for x in first]
    # The prompt, its continuation and a new question: the first n + 5 tokens come from the cache.
    ids = tokenizer.encode(prompt) + [entry(x)[1]["id"] for x in first]
    follow = tokenizer.decode(ids) + " Then what?"
    assert tokenizer.encode(follow)[: n + 6] == ids  # the text re-encodes to the same tokens
    third = server.generate(prompt=follow, temperature=0, max_new_tokens=2)
    stats = entry(third[-1])[1]
    assert stats["cached_tokens"] == n + 5 and stats["computed_tokens"] == stats["prompt_tokens"] - (n + 5)
    s = server.stats()
    assert s["cache_entries"] <= 4 and s["cache_bytes_used"] > 0 and s["cache_blocks_limit"] >= s["cache_blocks"]


def test_a_dead_worker_fails_its_stream_and_the_next_request_gets_a_replacement(server):
    import psutil

    expected = server.generate(prompt="Once upon a time", temperature=0, max_new_tokens=12)
    workers = [p for p in psutil.Process(server.proc.pid).children() if "workers" in " ".join(p.cmdline())]
    assert len(workers) == 2
    with requests.post(server.url, json={"prompt": "Once upon a time", "temperature": 0, "max_new_tokens": 40},
                       stream=True, timeout=60) as r:
        lines = []
        for line in r.iter_lines():
            lines.append(json.loads(line))
            if len(lines) == 3:
                workers[0].kill()
    # Killed during a pass, it is named at once and the stream ends with that error; killed between two passes,
    # it is replaced before the next one and the stream is fed again from its tokens, so it goes on.
    if "error" in lines[-1]:
        assert f"worker 0 (pid {workers[0].pid}) died" in lines[-1]["error"]
    else:
        assert len(lines) > 3 and not any("error" in line for line in lines), lines
    assert server.generate(prompt="Once upon a time", temperature=0, max_new_tokens=12) == expected
    assert server.proc.poll() is None


def test_workers_killed_while_idle_cost_no_request(server):
    """Dead workers are noticed before the next request (their process state) and replaced: it succeeds."""
    import psutil

    expected = server.generate(prompt="Once upon a time", temperature=0, max_new_tokens=12)
    server.wait_idle()
    workers = [p for p in psutil.Process(server.proc.pid).children() if "workers" in " ".join(p.cmdline())]
    for w in workers:
        w.kill()
    for w in workers:  # until every thread has exited: only then can the server see the process end
        deadline = time.monotonic() + 10
        while len(list(Path(f"/proc/{w.pid}/task").glob("*"))) > 1 or w.status() != psutil.STATUS_ZOMBIE:
            assert time.monotonic() < deadline
            time.sleep(0.01)
    again = server.generate(prompt="Once upon a time", temperature=0, max_new_tokens=12)
    assert [(k, v["id"]) for k, v in map(entry, again)] == [(k, v["id"]) for k, v in map(entry, expected)]
    assert entry(again[-1])[1]["cached_tokens"] == 0  # the prompt cache went with the old workers
    replacements = [p for p in psutil.Process(server.proc.pid).children() if "workers" in " ".join(p.cmdline())]
    assert len(replacements) == 2 and not {p.pid for p in replacements} & {w.pid for w in workers}


def test_example_client(server):
    r = subprocess.run([sys.executable, str(ROOT / "examples" / "api_hello_world.py"), "Hello", server.url],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("Hello") and len(r.stdout) > len("Hello\n")


# ---- exit after one query ------------------------------------------------------------------------------


def test_exit_after_one_query(demo_gguf):
    # The reference model in one process; a 4 MiB cache budget holds 5 KV blocks of 16 positions (720 KiB each,
    # f32 as the file's blocks keep it: --dtype gguf, where auto would widen to f16 on a CPU without AVX-512).
    s = Server(CLI_LAUNCHER, "--model-path", str(demo_gguf), "--workers", "0", "--max-seq-len", "32", "--dtype", "gguf",
               "--inference-server-port", "0", "--inference-server-prompt-cache-memory", "4",
               "--inference-server-exit-after-one-query")
    try:
        assert "in 5 KV blocks of 720 KiB" in "".join(s.lines)
        assert s.post({"prompt": 1}).status_code == 400  # a refused request is not a query served
        assert s.proc.poll() is None
        lines = s.generate(prompt="Hi", temperature=0, max_new_tokens=2)
        assert len(lines) == 2
        assert s.proc.wait(30) == 0
    finally:
        s.stop()


# ---- the prompt cache on disk ----------------------------------------------------------------------------


def test_prompt_cache_dir_survives_a_restart_with_other_workers(demo_gguf, tokenizer, tmp_path):
    """A server on 2 workers saves its prompt cache; after it stops, the command-line server on 1 worker
    loads it from the same directory (skipping a corrupt file with one warning line), and a repeated prompt
    computes only its last token."""
    cache_dir = tmp_path / "prompt-cache"
    prompt = "A standard priming prompt: you are a helpful assistant. Question:"
    n = len(tokenizer.encode(prompt))
    cfg = {"model": str(demo_gguf), "workers": 2, "max_seq_len": 64,
           "serve": {"max_concurrent": 2, "max_queue": 1, "prompt_cache_size": 4, "prompt_cache_dir": str(cache_dir)}}
    first = Server(LAUNCHER, json.dumps(cfg))
    try:
        lines = first.generate(prompt=prompt, temperature=0, max_new_tokens=5)
        assert entry(lines[-1])[1]["computed_tokens"] == n
    finally:
        first.stop()
    assert first.proc.returncode == 0, "".join(first.lines)
    assert len(list(cache_dir.glob("*.safetensors"))) == 1  # written before the server exited
    (cache_dir / "corrupt.safetensors").write_bytes(b"\x00" * 100)

    second = Server(CLI_LAUNCHER, "--model-path", str(demo_gguf), "--workers", "1", "--max-seq-len", "64",
                    "--dtype", "f32",  # as the first: the CLI's default for this Q4_1 file is another cache
                    "--inference-server-port", "0", "--prompt-cache-dir", str(cache_dir))
    try:
        again = second.generate(prompt=prompt, temperature=0, max_new_tokens=5)
        stats = entry(again[-1])[1]
        assert stats["prompt_tokens"] == n and stats["cached_tokens"] == n - 1 and stats["computed_tokens"] == 1
        assert [entry(x)[1]["id"] for x in again] == [entry(x)[1]["id"] for x in lines]
        assert second.stats()["cache_loaded"] == 1
    finally:
        second.stop()
    log = "".join(second.lines)
    warnings = [line for line in second.lines if "prompt cache:" in line]
    assert len(warnings) == 1 and "corrupt.safetensors" in warnings[0], log
    assert "Traceback" not in log
