"""Who may talk to the server: the Host header, an API key, and which web pages may call it (CORS).

- **Host** (DNS rebinding): a web page can make a browser send requests to 127.0.0.1 under the page's own
  name, by pointing that name's DNS at 127.0.0.1; the browser then treats the server as the page's origin
  and lets the page read the answers.  The one thing such a request cannot hide is its Host header, which
  names the page's domain.  So on a loopback bind the server answers only ``localhost``, ``127.0.0.1`` and
  ``[::1]`` (any port); on another bind (reached by names we cannot guess) any name, unless
  ``--allowed-hosts`` lists them — a list that then holds on any bind, the loopback names always included.
  Anything else is 403 (:class:`HostNotAllowed`).
- **API key** (``--api-key``): every route of both APIs, the stats and ``/metrics`` too (not ``/health``), wants ``Authorization: Bearer <key>``
  (what the ``openai`` client sends for its ``api_key``), 401 otherwise (:class:`Unauthorized`).  CORS
  preflights carry no credentials by design and are exempt; they only answer which headers may be sent.
- **CORS** is off unless ``--cors-origin`` names the origins (``scheme://host[:port]``, or ``*``) whose pages may
  call the APIs from a browser: then aiohttp-cors answers their preflights and labels the answers.  Without
  it a browser lets no other site read an answer, and the only requests it sends unasked — "simple" ones,
  a form's content types — are refused unread (415, ``schemas.check_content_type``).

Both applications (rllama's and the OpenAI sub-application) install :func:`guard_middleware` inside their
error middleware, so that each answers a refusal in its own error shape.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import re
import secrets
from typing import Awaitable, Callable, Iterable

import aiohttp_cors
from aiohttp import web

from ..errors import ShardllamaError, UsageError

LOOPBACK_NAMES = frozenset({"localhost", "127.0.0.1", "::1"})
KEYLESS_PATHS = frozenset({"/health"})  # open without the API key: orchestrators poll it (it tells only the state)
_PORT = re.compile(r"\d{1,5}")
_ORIGIN = re.compile(r"[a-z][a-z0-9+.-]*://[^\s/?#@]+")


class HostNotAllowed(ShardllamaError):
    """The request's Host header names a host this server does not answer for (HTTP 403)."""

    code = "host_not_allowed"


class Unauthorized(ShardllamaError):
    """No API key, or the wrong one (HTTP 401)."""

    headers = {"WWW-Authenticate": "Bearer"}
    code = "invalid_api_key"  # OpenAI's code for it


def host_name(host: str) -> str | None:
    """The name in a Host header (``name``, ``name:port``, ``[v6]``, ``[v6]:port``), lowercased, without
    brackets, port or trailing dot; None if it is not one of those shapes."""
    host = host.strip().lower()
    if host.startswith("["):
        name, sep, rest = host[1:].partition("]")
        if not sep or (rest and not (rest[0] == ":" and _PORT.fullmatch(rest[1:]))):
            return None
    else:
        name, sep, port = host.partition(":")
        if sep and not _PORT.fullmatch(port):
            return None
    name = name.rstrip(".")
    return name if name and not any(c in name for c in "/\\@ \t[]") else None


def is_loopback(bind: str) -> bool:
    """Whether the server listens on loopback only (``localhost`` or a loopback address)."""
    if bind.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(bind.strip("[]")).is_loopback
    except ValueError:
        return False


@dataclasses.dataclass(frozen=True)
class Access:
    """The server's access rules; the default answers anyone, as a bare ``create_app`` did."""

    allowed_hosts: frozenset[str] | None = None  # Host names answered; None: any
    api_key: str | None = dataclasses.field(default=None, repr=False)
    cors_origins: tuple[str, ...] = ()

    @classmethod
    def build(cls, bind: str, allowed_hosts: Iterable[str] = (), api_key: str | None = None,
              cors_origins: Iterable[str] = ()) -> "Access":
        """The rules for a server bound to ``bind`` (see the module docstring); UsageError naming a bad value."""
        names = set()
        for entry in allowed_hosts:
            name = "*" if entry.strip() == "*" else host_name(entry)
            if name is None:
                raise UsageError(f"--allowed-hosts: {entry!r} is not a host name")
            names.add(name)
        if "*" in names:
            hosts = None
        elif names:
            hosts = frozenset(names | LOOPBACK_NAMES)
        else:
            hosts = LOOPBACK_NAMES if is_loopback(bind) else None
        if api_key is not None and not api_key.strip():
            raise UsageError("--api-key is empty")
        origins = []
        for entry in cors_origins:
            origin = entry.strip().rstrip("/").lower()
            if origin != "*" and not _ORIGIN.fullmatch(origin):
                raise UsageError(f"--cors-origin: {entry!r} is not an origin (scheme://host[:port], or *)")
            origins.append(origin)
        return cls(allowed_hosts=hosts, api_key=api_key, cors_origins=tuple(dict.fromkeys(origins)))

    def check(self, request: web.Request) -> None:
        """HostNotAllowed or Unauthorized unless ``request`` may be answered."""
        if self.allowed_hosts is not None:
            given = request.headers.get("Host")
            if given is None or host_name(given) not in self.allowed_hosts:
                names = ", ".join(sorted(f"[{n}]" if ":" in n else n for n in self.allowed_hosts))
                shown = given if given is None or len(given) <= 80 else given[:77] + "..."
                raise HostNotAllowed(f"Host {shown!r} is not served here: use one of {names} "
                                     "(or start the server with --allowed-hosts)")
        if self.api_key is not None and not _is_preflight(request) and request.path not in KEYLESS_PATHS:
            scheme, _, key = request.headers.get("Authorization", "").partition(" ")
            given_key, want = key.strip().encode(errors="surrogatepass"), self.api_key.encode(errors="surrogatepass")
            if scheme.lower() != "bearer" or not secrets.compare_digest(given_key, want):
                raise Unauthorized("missing or wrong API key: send the header 'Authorization: Bearer <key>'")


def _is_preflight(request: web.Request) -> bool:
    return request.method == "OPTIONS" and "Access-Control-Request-Method" in request.headers


def guard_middleware(access: Access):
    """Checks every request with ``access``, once: in the innermost application it is routed to (a /v1
    request passes through both applications' middlewares), inside that application's error middleware."""

    @web.middleware
    async def guard(request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]):
        if request.app is request.match_info.apps[-1]:
            access.check(request)
        return await handler(request)

    return guard


def enable_cors(app: web.Application, access: Access) -> None:
    """With ``--cors-origin``: preflights answered and responses labelled for those origins, on every route of
    ``app`` (call it once the routes are added, before sub-applications are).  Without: nothing."""
    if not access.cors_origins:
        return
    options = aiohttp_cors.ResourceOptions(allow_methods=("GET", "POST"), expose_headers="*", max_age=600,
                                           allow_headers=("Content-Type", "Authorization"))
    cors = aiohttp_cors.setup(app, defaults={origin: options for origin in access.cors_origins})
    for resource in list(app.router.resources()):
        if isinstance(resource, web.Resource):
            cors.add(resource)
