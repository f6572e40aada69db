"""Running the server: the port is bound before the model loads, ``GET /health`` says when it is ready, every
other route answers 503 with Retry-After meanwhile (and while a worker is replaced), ``GET /metrics`` in
Prometheus' format, ``GET /v1/models/{id}`` and OpenAI's error codes.

One real server process on the demo model with one worker and an API key; its ``load()`` waits for a file
the test creates, so the loading phase lasts exactly as long as the test needs it to.
"""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import openai
import psutil
import pytest
import requests
from prometheus_client.parser import text_string_to_metric_families

from .test_server import Server

KEY = "ops-key"
API = "/rllama/v1/inference"

# serve() whose load() first waits for the file cfg["go"] (the test's hook to hold the loading phase).
LAUNCHER = """
import json, logging, os, sys, time
from shardllama.kv_cache import BLOCK_SIZE
from shardllama.runtime import RuntimeConfig
from shardllama.server import serve
from shardllama.server.config import ServerConfig
cfg = json.loads(sys.argv[1])
logging.basicConfig(level=logging.WARNING, format="shardllama: %(message)s")
config = ServerConfig(host="127.0.0.1", port=0, **cfg["serve"])
runtime = RuntimeConfig(model_path=cfg["model"], max_seq_len=cfg["max_seq_len"], workers=cfg["workers"])
def load():
    while not os.path.exists(cfg["go"]):
        time.sleep(0.05)
    with runtime.prepare() as prepared:
        n_blocks = config.kv_blocks(prepared.max_seq_len, prepared.kv_bytes_per_token(cfg["workers"]), BLOCK_SIZE)
        return runtime.start(prepared, n_blocks=n_blocks)
sys.exit(serve(config, load))
"""


@pytest.fixture(scope="module")
def loading(demo_gguf, tmp_path_factory):
    """The server, bound and still loading until ``release(server)``."""
    go = tmp_path_factory.mktemp("ops") / "go"
    cfg = {"model": str(demo_gguf), "workers": 1, "max_seq_len": 96, "go": str(go),
           "serve": {"max_concurrent": 1, "max_queue": 0, "prompt_cache_size": 2, "api_key": KEY}}
    s = Server(LAUNCHER, json.dumps(cfg), ready="listening on")
    s.go = go
    yield s
    s.stop()
    log = "".join(s.lines)
    assert s.proc.returncode == 0, log  # SIGTERM is a clean stop
    assert "Traceback" not in log and "internal error" not in log, log
    assert "server stopped" in log


def release(server: Server) -> None:
    server.go.touch()
    deadline = time.monotonic() + 120
    while (r := get(server, "/health")).status_code != 200:
        assert r.status_code == 503 and r.json()["status"] == "loading", r.text
        assert time.monotonic() < deadline, "the model did not load"
        time.sleep(0.1)
    assert r.json() == {"status": "ok"}


@pytest.fixture(scope="module")
def server(loading):
    if not loading.go.exists():
        release(loading)
    return loading


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.base + "/v1", api_key=KEY, max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def model(client):
    return client.models.list().data[0].id


def get(server: Server, path: str, key: str | None = None) -> requests.Response:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    return requests.get(server.base + path, headers=headers, timeout=30)


def post(server: Server, path: str, body: dict) -> requests.Response:
    return requests.post(server.base + path, json=body, headers={"Authorization": f"Bearer {KEY}"}, timeout=60)


def metrics(server: Server) -> dict[tuple[str, tuple], float]:
    """Every sample of /metrics: (name, sorted labels) -> value."""
    r = get(server, "/metrics", KEY)
    assert r.status_code == 200 and r.headers["Content-Type"].startswith("text/plain"), r.text
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(r.text) for s in family.samples}


def wait_idle(server: Server, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while (m := metrics(server))[("shardllama_running_requests", ())] or m[("shardllama_queue_depth", ())]:
        assert time.monotonic() < deadline, "the server did not become idle"
        time.sleep(0.05)


# ---- loading ----------------------------------------------------------------------------------------------


def test_the_port_answers_before_the_model_loads(loading):
    assert "serving POST" not in "".join(loading.lines)  # bound, not loaded: load() waits for the test
    r = get(loading, "/health")  # no key needed
    assert r.status_code == 503 and r.json()["status"] == "loading" and int(r.headers["Retry-After"]) > 0
    for method, path, body in [("GET", "/v1/models", None), ("POST", "/v1/completions", {"prompt": "x"}),
                               ("GET", "/v1/models/anything", None)]:
        r = requests.request(method, loading.base + path, json=body, timeout=30,
                             headers={"Authorization": f"Bearer {KEY}"})
        assert r.status_code == 503 and int(r.headers["Retry-After"]) > 0, (path, r.text)
        error = r.json()["error"]
        assert error["code"] == "model_loading" and error["type"] == "service_unavailable_error", r.text
        assert "loading" in error["message"]
    r = post(loading, API, {"prompt": "x"})  # rllama's API: its own error shape, the same 503
    assert r.status_code == 503 and "loading" in r.json()["error"] and int(r.headers["Retry-After"]) > 0
    assert metrics(loading)[("shardllama_ready", ())] == 0  # /metrics answers while loading
    release(loading)
    assert "serving POST" in "".join(loading.lines)
    assert metrics(loading)[("shardllama_ready", ())] == 1


# ---- health, metrics and the key --------------------------------------------------------------------------


def test_metrics_needs_the_key_and_health_does_not(server):
    assert get(server, "/health").status_code == 200
    for key in (None, "wrong"):
        r = get(server, "/metrics", key)
        assert r.status_code == 401 and r.headers["WWW-Authenticate"] == "Bearer", r.text
    assert get(server, "/metrics", KEY).status_code == 200


def test_metrics_count_a_completion(server, client, model):
    before = metrics(server)
    r = client.completions.create(model=model, prompt="The meaning of life is", max_tokens=5, temperature=0)
    n = r.usage.completion_tokens
    after = metrics(server)

    def moved(name: str, **labels) -> float:
        key = (name, tuple(sorted(labels.items())))
        return after.get(key, 0) - before.get(key, 0)

    assert moved("shardllama_http_requests_total", route="/v1/completions", status="200") == 1
    assert moved("shardllama_generation_tokens_total") == n
    assert moved("shardllama_prompt_tokens_total") == r.usage.prompt_tokens
    assert moved("shardllama_engine_requests_total", outcome="completed") == 1
    assert moved("shardllama_time_to_first_token_seconds_count") == 1
    passes = moved("shardllama_forward_pass_seconds_count", kind="decode") + moved(
        "shardllama_forward_pass_seconds_count", kind="prefill")
    assert passes >= n  # one pass per token at least (the first token's comes from the prompt's)
    assert moved("shardllama_forward_pass_seconds_sum", kind="decode") > 0
    assert after[("shardllama_queue_depth", ())] == 0 and after[("shardllama_running_requests", ())] == 0
    # The same prompt again: the prompt cache serves its prefix, and the metrics say so.
    client.completions.create(model=model, prompt="The meaning of life is", max_tokens=1, temperature=0)
    again = metrics(server)
    assert again[("shardllama_prompt_cache_hits_total", ())] > after[("shardllama_prompt_cache_hits_total", ())]
    assert (again[("shardllama_prompt_cache_cached_tokens_total", ())]
            > after[("shardllama_prompt_cache_cached_tokens_total", ())])


# ---- OpenAI's routes and codes ----------------------------------------------------------------------------


def test_models_by_id(server, client, model):
    m = client.models.retrieve(model)
    assert m.id == model and m.object == "model"
    with pytest.raises(openai.NotFoundError) as e:
        client.models.retrieve("gpt-4o")
    assert e.value.code == "model_not_found" and e.value.body["param"] == "model"
    assert e.value.body["type"] == "not_found_error"
    assert get(server, "/v1/models/org/name", KEY).json()["error"]["code"] == "model_not_found"  # a slash too


def test_a_prompt_longer_than_the_context_is_context_length_exceeded(client, model):
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model=model, prompt="word " * 200, max_tokens=1)
    assert e.value.code == "context_length_exceeded" and e.value.body["param"] == "prompt"
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=model, messages=[{"role": "user", "content": "word " * 200}])
    assert e.value.code == "context_length_exceeded"


def test_a_full_server_is_overloaded_with_retry_after_on_both_apis(server, client, model):
    # One run place, no queue: a streaming generation holds it while the other requests arrive.
    stream = client.completions.create(model=model, prompt="Once upon a time", max_tokens=80, temperature=0,
                                       stream=True)
    try:
        next(iter(stream))
        with pytest.raises(openai.APIStatusError) as e:
            client.completions.create(model=model, prompt="Hi", max_tokens=1)
        assert e.value.status_code == 503 and e.value.code == "server_is_overloaded"
        assert int(e.value.response.headers["Retry-After"]) > 0
        r = post(server, API, {"prompt": "Hi", "max_new_tokens": 1})
        assert r.status_code == 503 and "busy" in r.json()["error"] and int(r.headers["Retry-After"]) > 0
        assert get(server, "/health").status_code == 200  # busy is not unhealthy
    finally:
        stream.close()
    wait_idle(server)  # the closed stream's generation stops at its next token


# ---- a worker replaced ------------------------------------------------------------------------------------


def test_health_says_recovering_while_a_worker_is_replaced(server, client, model):
    wait_idle(server)
    workers = [p for p in psutil.Process(server.proc.pid).children(recursive=True)
               if "workers" in " ".join(p.cmdline())]
    assert len(workers) == 1, workers
    w = workers[0]
    w.kill()
    deadline = time.monotonic() + 10  # until every thread has exited: only then can the server see the process end
    while len(list(Path(f"/proc/{w.pid}/task").glob("*"))) > 1 or w.status() != psutil.STATUS_ZOMBIE:
        assert time.monotonic() < deadline
        time.sleep(0.01)
    # The next request finds the worker gone and starts a new one (importing torch takes it seconds):
    # meanwhile /health and every other route say so.
    done: list = []
    request = threading.Thread(target=lambda: done.append(
        client.completions.create(model=model, prompt="Hello", max_tokens=2, temperature=0)))
    request.start()
    seen, refused = set(), None
    deadline = time.monotonic() + 120
    while request.is_alive() and time.monotonic() < deadline:
        r = get(server, "/health")
        seen.add(r.json()["status"])
        if r.status_code == 503 and refused is None:
            assert r.json()["status"] == "recovering" and int(r.headers["Retry-After"]) > 0, r.text
            refused = get(server, "/v1/models", KEY)
        time.sleep(0.05)
    request.join(60)
    assert done, "".join(server.lines)
    assert done[0].usage.completion_tokens == 2  # the waiting request ran on the new worker
    assert "recovering" in seen, seen
    assert refused.status_code in (200, 503)  # the replacement may have ended in between
    if refused.status_code == 503:
        assert refused.json()["error"]["code"] == "worker_failed" and "Retry-After" in refused.headers
    assert get(server, "/health").json() == {"status": "ok"}
