"""A model's chat template (jinja source from GGUF ``tokenizer.chat_template`` or tokenizer_config.json),
rendered the way transformers' ``apply_chat_template`` renders it.

Templates come from model files, so they run in jinja2's immutable sandbox with the same environment HF
builds (``trim_blocks``, ``lstrip_blocks``, ``loopcontrols``, a ``tojson`` that keeps non-ASCII text) and
the two helpers templates call: ``raise_exception(message)`` and ``strftime_now(format)``.
"""

from __future__ import annotations

import datetime
import functools
import json
from collections.abc import Mapping, Sequence
from typing import Any

import jinja2
import jinja2.ext
import jinja2.meta
from jinja2.sandbox import ImmutableSandboxedEnvironment

from .errors import ModelFileError, UnsupportedError, UsageError, one_line


def _raise_exception(message: str):
    raise UnsupportedError(f"chat template: {message}")


def _strftime_now(fmt: str) -> str:
    return datetime.datetime.now().strftime(fmt)


def _tojson(value: Any, ensure_ascii: bool = False, indent: int | None = None, separators=None,
            sort_keys: bool = False) -> str:
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


@functools.lru_cache(maxsize=8)
def compile_template(source: str) -> jinja2.Template:
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    try:
        return env.from_string(source)
    except jinja2.TemplateError as e:
        raise ModelFileError(f"the model's chat template does not compile ({one_line(e)})") from None


@functools.lru_cache(maxsize=8)
def uses_tools(source: str) -> bool:
    """Whether the template reads a ``tools`` variable (it then writes tool definitions its own way)."""
    env = ImmutableSandboxedEnvironment(extensions=[jinja2.ext.loopcontrols])
    try:
        return "tools" in jinja2.meta.find_undeclared_variables(env.parse(source))
    except jinja2.TemplateError:
        return False


def render(source: str, messages: Sequence[Mapping[str, Any]], *, add_generation_prompt: bool = True,
           bos_token: str = "", eos_token: str = "", tools: list[dict] | None = None) -> str:
    """The conversation ``messages`` ([{"role": ..., "content": ...}]) as the template writes it;
    ``tools`` (OpenAI's ``[{"type": "function", "function": {...}}]``) for a template that :func:`uses_tools`."""
    extra = {} if tools is None else {"tools": tools}
    try:
        return compile_template(source).render(messages=[dict(m) for m in messages],
                                               add_generation_prompt=add_generation_prompt,
                                               bos_token=bos_token, eos_token=eos_token, **extra)
    except jinja2.TemplateError as e:  # a sandbox violation or a runtime error inside the template
        raise ModelFileError(f"the model's chat template failed ({one_line(e)})") from None


def render_for(tokenizer, messages: Sequence[Mapping[str, Any]], *, add_generation_prompt: bool = True,
               tools: list[dict] | None = None) -> str:
    """``messages`` through ``tokenizer``'s own template, with its BOS / EOS text; UsageError if it has none."""
    if not tokenizer.chat_template:
        raise UsageError(f"{tokenizer.source}: the model has no chat template (tokenizer.chat_template in the GGUF "
                         "or chat_template in tokenizer_config.json)")
    def text(i):
        return tokenizer.token_text(i) if i is not None else ""

    return render(tokenizer.chat_template, messages, add_generation_prompt=add_generation_prompt,
                  bos_token=text(tokenizer.bos_id), eos_token=text(tokenizer.eos_id), tools=tools)
