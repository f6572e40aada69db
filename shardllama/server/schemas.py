"""The rllama inference request: its fields, defaults and validation, and nothing about HTTP.

rllama's API (``POST /rllama/v1/inference``) takes one JSON object::

    prompt              string, required
    temperature         number >= 0 (0 = greedy), default 0.2 as on the command line
    top_k               integer >= 1, default 20
    top_p               number in (0, 1], default 1.0
    repetition_penalty  number > 0, default 1.0 (off; > 1 discourages repeats)
    presence_penalty    number in [-2, 2], default 0 (OpenAI's; > 0 discourages any token already generated)
    frequency_penalty   number in [-2, 2], default 0 (OpenAI's; > 0 discourages a token by its generated count)
    min_p               number in [0, 1], default 0 (off): keeps tokens at least min_p times as likely as the top
    logit_bias          object, token id (a string, as OpenAI sends it, or an integer) -> number in [-100, 100]
                        added to that token's logit; default none
    stop_at_end_token   bool, default true
    max_seq_len         integer >= 1, default 1024, clamped to the server's --max-seq-len
    max_new_tokens      integer >= 0, default 1024
    no_token_sampling   bool, default false
    top_probs           integer in [0, 20], optional (ours): each token line carries the ``top_probs`` most
                        likely tokens under the model's own distribution (see :mod:`.app`)
    seed                integer in [0, 2**64), optional (ours): reproducible sampling
    cache_salt          string of 1 to 256 characters, optional (vLLM's name): shares cached prompt prefixes
                        (and ``cached_tokens``) only with requests of the same salt; without one, with every
                        request that has none (``prompt_cache``)

``null`` means the default (rllama's fields were ``Option``s); unknown fields are ignored, as rllama's
serde did.  Every mistake raises :class:`RequestError` with a one-line message naming the field.
"""

from __future__ import annotations

import dataclasses
import json
import math
import sys
from typing import Any

from ..errors import ShardllamaError
from ..sampling import MAX_LOGIT_BIAS, MAX_PENALTY, SamplingParams

JSON_TYPE = "application/json"
MAX_CACHE_SALT = 256  # characters
MAX_TOP_PROBS = 20  # as OpenAI's top_logprobs


class RequestError(ShardllamaError):
    """A request the server cannot act on: bad JSON, a missing or ill-typed field, a value out of range.
    ``param`` names the field at fault, where there is one (OpenAI's error body carries it)."""

    def __init__(self, message: str, param: str | None = None):
        super().__init__(message)
        self.param = param


class UnsupportedMediaType(RequestError):
    """A request body in a format other than JSON."""

    code = "unsupported_media_type"


@dataclasses.dataclass(frozen=True)
class InferenceRequest:
    prompt: str
    temperature: float = SamplingParams.temperature
    top_k: int = 20
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    stop_at_end_token: bool = True
    max_seq_len: int = 1024
    max_new_tokens: int = 1024
    no_token_sampling: bool = False
    top_probs: int | None = None
    seed: int | None = None
    cache_salt: str | None = None
    min_p: float = 0.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: tuple[tuple[int, float], ...] = ()

    def sampling(self) -> SamplingParams:
        return SamplingParams(temperature=self.temperature, top_k=self.top_k, top_p=self.top_p,
                              repetition_penalty=self.repetition_penalty, min_p=self.min_p,
                              presence_penalty=self.presence_penalty, frequency_penalty=self.frequency_penalty,
                              logit_bias=self.logit_bias)


def check_content_type(content_type: str | None, charset: str | None) -> None:
    """A body must be declared ``application/json`` (UTF-8, if a charset is named), as rllama's example client
    and every JSON client send it; anything else is UnsupportedMediaType (415).  Taking text/plain or a form
    as JSON would let any web page POST to the server: those "simple" types need no CORS preflight."""
    if content_type != JSON_TYPE:
        raise UnsupportedMediaType(f"Content-Type must be {JSON_TYPE}, got {content_type or 'none'}: send the JSON "
                                   f"body with the header 'Content-Type: {JSON_TYPE}'")
    if charset is not None and charset.lower() not in ("utf-8", "utf8"):
        raise UnsupportedMediaType(f"the body must be UTF-8 JSON, Content-Type says charset={charset}")


def parse_json_object(body: bytes, *, required: str) -> dict[str, Any]:
    """``body`` (UTF-8 JSON) as a dict; RequestError naming what is wrong (``required``: the field an empty
    body is told to carry).  Shared with the OpenAI routes."""
    if not body.strip():
        raise RequestError(f'the request body is empty: send a JSON object with at least a "{required}"')
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as e:
        raise RequestError(f"the request body is not UTF-8 ({e.reason} at byte {e.start})") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise RequestError(f"invalid JSON: {e.msg} at line {e.lineno} column {e.colno}") from None
    except RecursionError:
        raise RequestError("invalid JSON: nested too deeply") from None
    except ValueError:  # not a JSONDecodeError: Python's limit on the digits of an integer it converts
        raise RequestError(f"invalid JSON: an integer of more than {sys.get_int_max_str_digits()} digits") from None
    if not isinstance(data, dict):
        raise RequestError(f"the request body must be a JSON object, got {_kind(data)}")
    _check_unicode(data)
    return data


def _check_unicode(data: dict[str, Any]) -> None:
    """RequestError naming a string (or key) that is not valid Unicode: JSON's escape "\\ud800" decodes to
    a lone surrogate, which UTF-8 and every tokenizer refuse.  Iterative: the body may be nested as deeply
    as json.loads allows."""
    stack: list[tuple[str | None, Any]] = [(None, data)]
    while stack:
        where, value = stack.pop()
        if isinstance(value, dict):
            for key, item in value.items():
                if (at := _lone_surrogate(key)) is not None:
                    inside = f'"{where}"' if where else "the body"
                    raise RequestError(f"a key in {inside} is not valid Unicode (a lone surrogate at character {at})",
                                       where)
                stack.append((key if where is None else f"{where}.{key}", item))
        elif isinstance(value, list):
            stack.extend((f"{where}[{i}]", item) for i, item in enumerate(value))
        elif isinstance(value, str) and (at := _lone_surrogate(value)) is not None:
            raise RequestError(f'"{where}" is not valid Unicode (a lone surrogate at character {at})', where)


def _lone_surrogate(text: str) -> int | None:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        return e.start
    return None


def finite(value: int | float) -> bool:
    """A JSON number that a float holds: False for NaN, infinities and integers beyond float's range
    (math.isfinite raises OverflowError on those)."""
    try:
        return math.isfinite(value)
    except OverflowError:
        return False


def show(value: Any) -> str:
    """A number for an error message: a huge integer by its digit count, so the message stays one line."""
    if isinstance(value, int) and not isinstance(value, bool) and abs(value) >= 10**20:
        return f"an integer of {len(str(abs(value)))} digits"
    return str(value)


def request_from_dict(data: dict[str, Any], *, vocab_size: int) -> InferenceRequest:
    """The request in ``data``; ``vocab_size``: the model's logits, which ``logit_bias`` ids must lie within."""
    if data.get("prompt") is None:
        raise RequestError('"prompt" is required (a string)')
    prompt = data["prompt"]
    if not isinstance(prompt, str):
        raise RequestError(f'"prompt" must be a string, got {_kind(prompt)}')
    fields: dict[str, Any] = {"prompt": prompt}

    def number(name: str) -> float | None:
        value = data.get(name)
        if value is None:
            return None
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise RequestError(f'"{name}" must be a number, got {_kind(value)}')
        if not finite(value):
            raise RequestError(f'"{name}" must be a finite number, got {show(value)}')
        fields[name] = value = float(value)
        return value

    def integer(name: str, minimum: int) -> int | None:
        value = data.get(name)
        if value is None:
            return None
        if isinstance(value, bool) or not isinstance(value, int):
            raise RequestError(f'"{name}" must be an integer, got {_kind(value)}')
        if value < minimum:
            raise RequestError(f'"{name}" must be >= {minimum}, got {show(value)}')
        fields[name] = value
        return value

    def boolean(name: str) -> None:
        value = data.get(name)
        if value is None:
            return
        if not isinstance(value, bool):
            raise RequestError(f'"{name}" must be true or false, got {_kind(value)}')
        fields[name] = value

    t = number("temperature")
    if t is not None and t < 0:
        raise RequestError(f'"temperature" must be >= 0 (0 = greedy), got {t}')
    integer("top_k", 1)
    p = number("top_p")
    if p is not None and not 0 < p <= 1:
        raise RequestError(f'"top_p" must be in (0, 1], got {p}')
    r = number("repetition_penalty")
    if r is not None and r <= 0:
        raise RequestError(f'"repetition_penalty" must be > 0 (1 = off), got {r}')
    m = number("min_p")
    if m is not None and not 0 <= m <= 1:
        raise RequestError(f'"min_p" must be in [0, 1] (0 = off), got {m}', "min_p")
    for name in ("presence_penalty", "frequency_penalty"):
        value = number(name)
        if value is not None and not -MAX_PENALTY <= value <= MAX_PENALTY:
            raise RequestError(f'"{name}" must be in [-{MAX_PENALTY:g}, {MAX_PENALTY:g}], got {value}', name)
    boolean("stop_at_end_token")
    integer("max_seq_len", 1)
    integer("max_new_tokens", 0)
    boolean("no_token_sampling")
    top = integer("top_probs", 0)
    if top is not None and top > MAX_TOP_PROBS:
        raise RequestError(f'"top_probs" must be <= {MAX_TOP_PROBS}, got {show(top)}')
    seed = integer("seed", 0)
    if seed is not None and seed >= 2**64:
        raise RequestError(f'"seed" must be < 2**64, got {show(seed)}')
    return InferenceRequest(**fields, cache_salt=cache_salt(data), logit_bias=logit_bias(data, vocab_size))


def logit_bias(data: dict[str, Any], vocab_size: int) -> tuple[tuple[int, float], ...]:
    """The request's ``logit_bias`` (both APIs): an object of token id -> bias in [-100, 100], the ids as
    strings (JSON's keys, as OpenAI's clients send them) or integers; as (id, bias) pairs."""
    value = data.get("logit_bias")
    if value is None:
        return ()
    if not isinstance(value, dict):
        raise RequestError(f'"logit_bias" must be an object of token id -> bias, got {_kind(value)}', "logit_bias")
    pairs = []
    for key, bias in value.items():
        token = key if isinstance(key, int) and not isinstance(key, bool) else None
        if isinstance(key, str) and key.isascii() and key.isdigit() and len(key) <= 20:
            token = int(key)
        if token is None or not 0 <= token < vocab_size:
            shown = show(key) if token is not None else json.dumps(key)[:40]
            raise RequestError(f'"logit_bias" names token {shown}: keys must be token ids in [0, {vocab_size}) '
                               f"(the model's vocabulary)", "logit_bias")
        if isinstance(bias, bool) or not isinstance(bias, (int, float)) or not finite(bias) \
                or not -MAX_LOGIT_BIAS <= bias <= MAX_LOGIT_BIAS:
            got = show(bias) if isinstance(bias, (int, float)) and not isinstance(bias, bool) else _kind(bias)
            raise RequestError(f'"logit_bias" of token {token} must be a number in [-{MAX_LOGIT_BIAS:g}, '
                               f"{MAX_LOGIT_BIAS:g}], got {got}", "logit_bias")
        pairs.append((token, float(bias)))
    if len({t for t, _ in pairs}) < len(pairs):  # "7" and "07"
        raise RequestError('"logit_bias" names a token twice', "logit_bias")
    return tuple(sorted(pairs))


def cache_salt(data: dict[str, Any]) -> str | None:
    """The request's ``cache_salt`` (both APIs): a string of 1 to MAX_CACHE_SALT characters, or None."""
    salt = data.get("cache_salt")
    if salt is None:
        return None
    if not isinstance(salt, str) or not salt:
        got = "an empty one" if salt == "" else _kind(salt)
        raise RequestError(f'"cache_salt" must be a non-empty string, got {got}', "cache_salt")
    if len(salt) > MAX_CACHE_SALT:
        raise RequestError(f'"cache_salt" is {len(salt)} characters long, at most {MAX_CACHE_SALT} are allowed',
                           "cache_salt")
    return salt


def _kind(value: Any) -> str:
    """A JSON value's type, as a person calls it."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, (int, float)):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "an array"
    if isinstance(value, dict):
        return "an object"
    return type(value).__name__
