"""What one client may learn of or do to the server and its other clients, through real HTTP clients
(requests, the official openai client, raw sockets): the Host header (DNS rebinding), the API key and CORS
on both APIs and the stats, cache_salt, and connections that send no complete request.  Two servers on the
demo model in-process: one as `serve()` starts by default (loopback, no key, no CORS), one from the command
line with --api-key, --cors-origin and --allowed-hosts."""

from __future__ import annotations

import json
import socket
import time

import openai
import pytest
import requests

from shardllama.errors import UsageError
from shardllama.server import app
from shardllama.server.access import Access, host_name, is_loopback

from .test_server import CLI_LAUNCHER, LAUNCHER, Server

IDLE = 1.5  # the plain server's idle-connection limit (30 s by default)
KEY = "s3cret-key"
ORIGIN = "http://localhost:3000"
ROUTES = [("POST", "/rllama/v1/inference", {"prompt": "Hi", "max_new_tokens": 1}),
          ("GET", "/rllama/v1/stats", None),
          ("GET", "/metrics", None),
          ("GET", "/v1/models", None),
          ("POST", "/v1/completions", {"prompt": "Hi", "max_tokens": 1}),
          ("POST", "/v1/chat/completions", {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 1})]


@pytest.fixture(scope="module")
def plain(demo_gguf):
    cfg = {"model": str(demo_gguf), "workers": 0, "max_seq_len": 64,
           "serve": {"max_concurrent": 2, "prompt_cache_size": 4, "idle_timeout": IDLE}}
    s = Server(LAUNCHER, json.dumps(cfg))
    yield s
    s.stop()
    assert "Traceback" not in "".join(s.lines)


@pytest.fixture(scope="module")
def guarded(demo_gguf):
    s = Server(CLI_LAUNCHER, "--model-path", str(demo_gguf), "--workers", "0", "--max-seq-len", "64",
               "--inference-server-port", "0", "--api-key", KEY, "--cors-origin", ORIGIN + "/",
               "--allowed-hosts", "api.example,Other.Example:443")
    yield s
    s.stop()
    assert "Traceback" not in "".join(s.lines)


def call(server: Server, method: str, path: str, body=None, **headers) -> requests.Response:
    headers = {k.replace("_", "-"): v for k, v in headers.items()}
    if body is not None:
        headers.setdefault("Content-Type", "application/json")
        body = json.dumps(body)
    return requests.request(method, server.base + path, data=body, headers=headers, timeout=60)


def message(r: requests.Response) -> str:
    error = r.json()["error"]
    return error["message"] if isinstance(error, dict) else error


# ---- the Host header ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("host", ["localhost", "localhost:8080", "127.0.0.1", "127.0.0.1:1", "[::1]", "[::1]:8080",
                                  "LocalHost.", "LOCALHOST:80"])
def test_a_loopback_bind_answers_loopback_names_with_any_port(plain, host):
    for method, path, body in ROUTES:
        r = call(plain, method, path, body, Host=host)
        assert r.status_code == 200, (path, r.text)


@pytest.mark.parametrize("host", ["evil.example", "evil.example:8080", "localhost.evil.example", "127.0.0.1.nip.io",
                                  "[::2]", "localhost:http", "localhost@evil.example", "127.0.0.1 evil.example"])
def test_a_loopback_bind_refuses_other_names_on_every_route(plain, host):
    # What a browser sends after DNS rebinding: the attacker's name for 127.0.0.1.
    for method, path, body in ROUTES + [("GET", "/no/such/path", None), ("POST", "/v1/embeddings", {})]:
        r = call(plain, method, path, body, Host=host)
        assert r.status_code == 403, (path, r.text)
        assert "is not served here" in message(r) and "--allowed-hosts" in message(r)
        assert isinstance(r.json()["error"], dict) == path.startswith("/v1")  # each API's own error shape


def test_a_request_without_host_is_refused_on_a_loopback_bind(plain):
    port = int(plain.base.rsplit(":", 1)[1])
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(b"GET /rllama/v1/stats HTTP/1.0\r\n\r\n")
        answer = b"".join(iter(lambda: s.recv(65536), b""))
    assert answer.startswith(b"HTTP/1.0 403") or answer.startswith(b"HTTP/1.1 403"), answer[:200]


def test_allowed_hosts_extend_the_loopback_names(guarded):
    auth = {"Authorization": f"Bearer {KEY}"}
    for host in ("api.example", "api.example:8443", "other.example", "localhost", "127.0.0.1:9"):
        assert call(guarded, "GET", "/v1/models", **auth, Host=host).status_code == 200, host
    r = call(guarded, "GET", "/v1/models", **auth, Host="evil.example")
    assert r.status_code == 403 and "api.example" in message(r)


def test_host_rules():
    assert [host_name(h) for h in ("LocalHost:80", "[::1]:8080", "[::1]", "a.example.")] == \
        ["localhost", "::1", "::1", "a.example"]
    assert [host_name(h) for h in ("", ":80", "::1", "[::1", "a:b", "a/b", "u@a", "[::1]x")] == [None] * 8
    assert is_loopback("127.0.0.1") and is_loopback("127.1.2.3") and is_loopback("::1") and is_loopback("localhost")
    assert not is_loopback("0.0.0.0") and not is_loopback("::") and not is_loopback("192.168.1.5")
    assert Access.build("127.0.0.1").allowed_hosts == {"localhost", "127.0.0.1", "::1"}
    assert Access.build("0.0.0.0").allowed_hosts is None  # reached by names we cannot know: any
    assert Access.build("0.0.0.0", ["a.example"]).allowed_hosts == {"a.example", "localhost", "127.0.0.1", "::1"}
    assert Access.build("127.0.0.1", ["a.example", "*"]).allowed_hosts is None
    assert KEY not in repr(Access.build("127.0.0.1", api_key=KEY))
    for bad, flag in [({"allowed_hosts": ["a/b"]}, "--allowed-hosts"), ({"cors_origins": ["localhost:3000"]},
                      "--cors-origin"), ({"cors_origins": ["http://a.example/path"]}, "--cors-origin"),
                      ({"api_key": ""}, "--api-key")]:
        with pytest.raises(UsageError, match=flag):
            Access.build("127.0.0.1", **bad)


def test_a_bad_access_flag_fails_before_the_model_is_opened(demo_gguf, monkeypatch, capsys):
    import shardllama.cli
    import shardllama.runtime

    def never(*a, **kw):
        raise AssertionError("the model was opened")

    monkeypatch.setattr(shardllama.runtime.RuntimeConfig, "prepare", never)
    code = shardllama.cli.main(["serve", "--model-path", str(demo_gguf), "--workers", "2", "--cors-origin", "nope"])
    assert code == 2 and "--cors-origin: 'nope' is not an origin" in capsys.readouterr().err


# ---- the API key -----------------------------------------------------------------------------------------


def test_the_api_key_may_come_from_the_environment(demo_gguf, monkeypatch):
    import shardllama.cli

    seen = []

    def build(bind, **kw):
        seen.append(kw["api_key"])
        raise UsageError("seen")

    monkeypatch.setattr(Access, "build", staticmethod(build))
    for env, argv, key in [("from-env", [], "from-env"), ("", [], None), ("from-env", ["--api-key", KEY], KEY)]:
        monkeypatch.setenv("SHARDLLAMA_API_KEY", env)
        assert shardllama.cli.main(["serve", "--model-path", str(demo_gguf), *argv]) == 2
        assert seen.pop() == key



def test_no_key_is_needed_without_api_key(plain):
    assert call(plain, "GET", "/v1/models").status_code == 200


@pytest.mark.parametrize("auth", [None, "Bearer wrong", f"Basic {KEY}", KEY, f"Bearer {KEY}x", "Bearer"])
def test_every_route_wants_the_key(guarded, auth):
    headers = {"Authorization": auth} if auth else {}
    for method, path, body in ROUTES:
        r = call(guarded, method, path, body, **headers)
        assert r.status_code == 401 and r.headers["WWW-Authenticate"] == "Bearer", (path, r.text)
        assert "Authorization: Bearer" in message(r)
        if path.startswith("/v1"):  # OpenAI's shape and code
            assert r.json()["error"]["code"] == "invalid_api_key"
            assert r.json()["error"]["type"] == "authentication_error"


def test_the_right_key_opens_every_route(guarded):
    for auth in (f"Bearer {KEY}", f"bearer  {KEY}"):
        for method, path, body in ROUTES:
            r = call(guarded, method, path, body, Authorization=auth)
            assert r.status_code == 200, (path, r.text)


def test_the_openai_client_with_and_without_the_key(guarded):
    client = openai.OpenAI(base_url=guarded.base + "/v1", api_key=KEY, max_retries=0, timeout=60)
    model = client.models.list().data[0].id
    r = client.completions.create(model=model, prompt="The meaning of life is", temperature=0, max_tokens=3)
    assert r.usage.completion_tokens == 3
    wrong = openai.OpenAI(base_url=guarded.base + "/v1", api_key="wrong", max_retries=0, timeout=60)
    with pytest.raises(openai.AuthenticationError) as e:
        wrong.chat.completions.create(model=model, messages=[{"role": "user", "content": "Hi"}], max_tokens=1)
    assert e.value.status_code == 401 and e.value.code == "invalid_api_key"


# ---- CORS ------------------------------------------------------------------------------------------------


def preflight(server: Server, path: str, origin: str) -> requests.Response:
    return requests.options(server.base + path, timeout=10, headers={
        "Origin": origin, "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "content-type,authorization"})


def test_cors_is_off_by_default(plain):
    for path in ("/rllama/v1/inference", "/v1/chat/completions"):
        r = preflight(plain, path, ORIGIN)
        assert r.status_code == 405 and "Access-Control-Allow-Origin" not in r.headers
    r = call(plain, "POST", "/v1/completions", {"prompt": "Hi", "max_tokens": 1}, Origin=ORIGIN)
    assert r.status_code == 200 and "Access-Control-Allow-Origin" not in r.headers  # the page cannot read it


def test_a_blind_cross_site_post_starts_nothing(plain):
    # A form on any site can POST text/plain or form-urlencoded without a preflight: refused unread.
    before = call(plain, "GET", "/rllama/v1/stats").json()["requests"]
    for ctype in ("text/plain", "application/x-www-form-urlencoded", "multipart/form-data; boundary=x"):
        r = requests.post(plain.base + "/rllama/v1/inference", data='{"prompt": "Hi"}', timeout=10,
                          headers={"Content-Type": ctype, "Origin": "https://evil.example"})
        assert r.status_code == 415
    assert call(plain, "GET", "/rllama/v1/stats").json()["requests"] == before


def test_cors_origin_lets_that_origin_in(guarded):
    for path in ("/rllama/v1/inference", "/v1/chat/completions", "/v1/models"):
        r = preflight(guarded, path, ORIGIN)  # no key: a preflight carries none
        assert r.status_code == 200, (path, r.text)
        assert r.headers["Access-Control-Allow-Origin"] == ORIGIN
        assert set(r.headers["Access-Control-Allow-Headers"].lower().split(",")) == {"content-type", "authorization"}
        r = preflight(guarded, path, "https://evil.example")
        assert r.status_code == 403 and "Access-Control-Allow-Origin" not in r.headers
    r = call(guarded, "POST", "/rllama/v1/inference", {"prompt": "Hi", "max_new_tokens": 1}, Origin=ORIGIN,
             Authorization=f"Bearer {KEY}")
    assert r.status_code == 200 and r.headers["Access-Control-Allow-Origin"] == ORIGIN
    r = call(guarded, "GET", "/v1/models", Origin=ORIGIN)  # the page may read why it was refused
    assert r.status_code == 401 and r.headers["Access-Control-Allow-Origin"] == ORIGIN
    r = call(guarded, "GET", "/v1/models", Origin="https://evil.example", Authorization=f"Bearer {KEY}")
    assert r.status_code == 200 and "Access-Control-Allow-Origin" not in r.headers


# ---- cache_salt ------------------------------------------------------------------------------------------


SECRET = "A system prompt that only Alice knows: the password is swordfish, and"


def rllama_cached(server: Server, salt: str | None) -> int:
    body = {"prompt": SECRET, "temperature": 0, "max_new_tokens": 1, **({"cache_salt": salt} if salt else {})}
    r = call(server, "POST", "/rllama/v1/inference", body)
    assert r.status_code == 200, r.text
    [line] = [json.loads(x) for x in r.text.splitlines()]
    return next(iter(line.values()))["cached_tokens"]


def test_cache_salt_shares_cached_prompts_only_within_a_salt(plain):
    assert rllama_cached(plain, "alice") == 0
    # Mallory guesses Alice's whole prompt: cached_tokens would tell her how much of it she got right.
    assert rllama_cached(plain, "mallory") == 0
    assert rllama_cached(plain, None) == 0
    n = rllama_cached(plain, "alice")
    assert n > 10  # Alice's own prompt: all but its last token reused
    assert rllama_cached(plain, None) == n  # requests without a salt share one cache, as before

    # The OpenAI API, same cache, same rule (its usage has no cached count: the server's counters tell).
    client = openai.OpenAI(base_url=plain.base + "/v1", api_key="none", max_retries=0, timeout=60)
    model = client.models.list().data[0].id

    def openai_cached(salt: str) -> int:
        before = call(plain, "GET", "/rllama/v1/stats").json()["cached_tokens"]
        client.completions.create(model=model, prompt=SECRET, temperature=0, max_tokens=1,
                                  extra_body={"cache_salt": salt})
        return call(plain, "GET", "/rllama/v1/stats").json()["cached_tokens"] - before

    assert openai_cached("carol") == 0 and openai_cached("dave") == 0
    assert openai_cached("carol") == n and openai_cached("alice") == n


@pytest.mark.parametrize("salt", ["", 5, ["a"], "x" * 257])
def test_a_bad_cache_salt_is_a_400(plain, salt):
    r = call(plain, "POST", "/rllama/v1/inference", {"prompt": "Hi", "cache_salt": salt})
    assert r.status_code == 400 and '"cache_salt"' in message(r)
    for path, body in [("/v1/completions", {"prompt": "Hi"}),
                       ("/v1/chat/completions", {"messages": [{"role": "user", "content": "Hi"}]})]:
        r = call(plain, "POST", path, {**body, "cache_salt": salt})
        assert r.status_code == 400 and r.json()["error"]["param"] == "cache_salt"


# ---- connections that send no complete request -------------------------------------------------------------


def exchange(server: Server, data: bytes) -> tuple[bytes, float]:
    """Send ``data`` on a raw connection, read until the server closes it: (what came back, seconds it took)."""
    port = int(server.base.rsplit(":", 1)[1])
    with socket.create_connection(("127.0.0.1", port), timeout=30) as s:
        s.sendall(data)
        start = time.monotonic()
        answer = b"".join(iter(lambda: s.recv(65536), b""))  # a socket.timeout here: never closed
        return answer, time.monotonic() - start


HEAD = b"POST /rllama/v1/inference HTTP/1.1\r\nHost: localhost\r\n"


@pytest.mark.parametrize("sent", [
    b"",  # connected, silent
    b"POST /rllama/v1/inf",  # half a request line
    HEAD + b"Content-Type: application/json\r\n",  # half the headers
])
def test_a_connection_without_a_complete_request_is_closed(plain, sent):
    answer, took = exchange(plain, sent)
    assert answer == b"" and IDLE - 0.5 < took < IDLE + 10


def test_a_body_that_does_not_arrive_gets_408_and_the_connection_closes(plain):
    answer, took = exchange(plain, HEAD + b'Content-Type: application/json\r\nContent-Length: 100\r\n\r\n{"prompt"')
    assert answer.startswith(b"HTTP/1.1 408 "), answer[:300]
    # Answered after IDLE; closed after at most IDLE more spent waiting for the rest of the body (lingering).
    assert b"did not arrive within 1.5 s" in answer and IDLE - 0.5 < took < 2 * IDLE + 5


def test_an_idle_kept_alive_connection_is_closed_after_its_answers(plain):
    get = b"GET /rllama/v1/stats HTTP/1.1\r\nHost: localhost\r\n\r\n"
    answer, took = exchange(plain, get + get)  # two requests answered, then nothing more: closed
    assert answer.count(b"HTTP/1.1 200 OK") == 2 and IDLE - 0.5 < took < IDLE + 10
    assert call(plain, "GET", "/rllama/v1/stats").status_code == 200  # and the server serves on


def test_the_default_limit_is_30_seconds():
    assert app.IDLE_TIMEOUT_S == 30
