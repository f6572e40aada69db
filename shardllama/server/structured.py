"""Structured output on the OpenAI routes: ``response_format`` (json_object, json_schema) and ``tools`` /
``tool_choice``, each turned into a grammar (``shardllama.grammar``) that constrains every generated token,
and the output turned back into OpenAI's ``tool_calls``.

A tool call is always written as one JSON object, ``{"name": <tool name>, "arguments": {...}}``, with the
arguments under the tool's ``parameters`` schema — whatever the chat template.  A template that reads
``tools`` (``chat_template.uses_tools``) shows the model the tools its own way; for one that does not (the
demo model's) the tools and this format are described in the system prompt (:data:`TOOLS_PROMPT`).
``tool_choice``:

- ``"none"``: the tools are not shown, the answer is text (``response_format`` still applies);
- ``"auto"`` (the default with tools): a tool call, or plain text that does not start with ``{``;
- ``"required"``: a call of one of the tools; ``{"type": "function", "function": {"name": ...}}``: of that one.

One call per answer (``parallel_tool_calls`` may be true: a single call is what it allows).  A call that
finishes (the grammar is complete) is answered with finish_reason ``"tool_calls"``; one cut by
``max_tokens`` stays text, with ``"length"``.  Streamed, a call arrives as one ``tool_calls`` delta at the
end; text streams as it comes.

Refused with a 400 naming the field: ``stop`` with JSON output or tool calls (a stop string could cut the
JSON), ``response_format`` JSON together with tools not turned off by ``"none"``, ``tools`` on
/v1/completions, the legacy ``functions`` / ``function_call``, and schemas llguidance cannot compile.
"""

from __future__ import annotations

import dataclasses
import json
import re
import secrets
from typing import Any

from .. import grammar
from ..chat_template import render_for, uses_tools
from ..errors import ShardllamaError
from ..grammar import Grammar
from ..tokenizer import Tokenizer
from .openai_schemas import ParamError, chat_messages
from .schemas import _kind

NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")

TOOLS_PROMPT = """You can call these tools (each with a JSON schema of its arguments):
{tools}
To call a tool, answer with only a JSON object {{"name": <tool name>, "arguments": <its arguments>}}.{rule}"""
RULES = {"auto": " Otherwise answer in plain text.", "required": " You must call one of them now."}


@dataclasses.dataclass(frozen=True)
class Structured:
    """What a request's ``response_format`` and ``tools`` ask for: a grammar, and whether it writes tool calls."""

    grammar: Grammar | None  # None: free text
    tools: tuple[dict, ...] = ()  # OpenAI's [{"type": "function", "function": {...}}], when shown to the model
    choice: str = "none"  # "none", "auto" or "required" (a named function is "required" with one tool)

    @property
    def calls(self) -> bool:
        return self.choice != "none"

    def constraint(self):
        """A fresh grammar.Constraint for one generated sequence (each of ``n`` choices needs its own)."""
        return self.grammar.constraint() if self.grammar is not None else None


def parse(data: dict[str, Any], tokenizer: Tokenizer, stop: tuple[str, ...], *, chat: bool) -> Structured | None:
    """The request's structured-output fields, validated and compiled (may take ~0.4 s the first time per
    tokenizer: run it in a thread).  None when it asks for free text."""
    for legacy in ("functions", "function_call"):
        if data.get(legacy) is not None:
            raise ParamError(f'"{legacy}" is not supported: use "tools" and "tool_choice"', legacy)
    fmt = _response_format(data.get("response_format"), tokenizer)
    tools, choice = _tools(data, chat)
    if choice != "none" and fmt is not None:
        raise ParamError('"response_format" cannot be combined with "tools" (unless "tool_choice" is "none"): '
                         "a tool call is JSON of its own", "response_format")
    if (fmt is not None or choice != "none") and stop:
        raise ParamError('"stop" cannot be used with JSON output or tool calls: a stop string could cut the JSON',
                         "stop")
    if choice == "none":
        return Structured(fmt) if fmt is not None else None
    return Structured(_call_grammar(tokenizer, tools, choice), tuple(tools), "auto" if choice == "auto" else "required")


def _response_format(fmt: Any, tokenizer: Tokenizer) -> Grammar | None:
    param = "response_format"
    if fmt is None:
        return None
    if not isinstance(fmt, dict):
        raise ParamError(f'"{param}" must be an object, got {_kind(fmt)}', param)
    kind = fmt.get("type")
    if kind == "text":
        return None
    if kind == "json_object":
        return grammar.json_object(tokenizer, param=param)
    if kind != "json_schema":
        raise ParamError(f'"{param}.type" must be "text", "json_object" or "json_schema", got {_kind(kind)}',
                         f"{param}.type")
    spec = fmt.get("json_schema")
    if not isinstance(spec, dict):
        raise ParamError(f'"{param}.json_schema" must be an object, got {_kind(spec)}', f"{param}.json_schema")
    name, strict, schema = spec.get("name"), spec.get("strict"), spec.get("schema", {"type": "object"})
    if not isinstance(name, str) or not NAME.fullmatch(name):
        raise ParamError(f'"{param}.json_schema.name" must be 1 to 64 letters, digits, _ or -, got {_kind(name)}',
                         f"{param}.json_schema.name")
    if strict is not None and not isinstance(strict, bool):
        raise ParamError(f'"{param}.json_schema.strict" must be true or false', f"{param}.json_schema.strict")
    return grammar.json_schema(tokenizer, schema, strict=bool(strict), param=param)


def _tools(data: dict[str, Any], chat: bool) -> tuple[list[dict], str]:
    """The tools as OpenAI writes them, and "none", "auto", "required" or the one function's name."""
    tools, choice = data.get("tools"), data.get("tool_choice")
    if tools is None or tools == []:
        if choice not in (None, "none"):
            raise ParamError('"tool_choice" needs "tools"', "tool_choice")
        return [], "none"
    if not chat:
        raise ParamError('"tools" is only supported on /v1/chat/completions', "tools")
    if not isinstance(tools, list):
        raise ParamError(f'"tools" must be a list of tools, got {_kind(tools)}', "tools")
    out, names = [], set()
    for i, tool in enumerate(tools):
        where = f"tools[{i}]"
        if not isinstance(tool, dict) or tool.get("type") != "function" or not isinstance(tool.get("function"), dict):
            raise ParamError(f'"{where}" must be {{"type": "function", "function": {{...}}}}', where)
        f = tool["function"]
        name, params = f.get("name"), f.get("parameters", {"type": "object", "properties": {}})
        if not isinstance(name, str) or not NAME.fullmatch(name) or name in names:
            raise ParamError(f'"{where}.function.name" must be a unique name of 1 to 64 letters, digits, _ or -',
                             f"{where}.function.name")
        if not isinstance(params, dict):
            raise ParamError(f'"{where}.function.parameters" must be a JSON schema object, got {_kind(params)}',
                             f"{where}.function.parameters")
        if f.get("description") is not None and not isinstance(f["description"], str):
            raise ParamError(f'"{where}.function.description" must be a string', f"{where}.function.description")
        names.add(name)
        out.append({"type": "function", "function": {**f, "parameters": params}})
    if data.get("parallel_tool_calls") not in (None, True, False):
        raise ParamError('"parallel_tool_calls" must be true or false', "parallel_tool_calls")
    if choice is None:
        return out, "auto"
    if choice in ("none", "auto", "required"):
        return out, choice
    f = choice.get("function") if isinstance(choice, dict) else None
    name = f.get("name") if isinstance(f, dict) else None
    if not (isinstance(choice, dict) and choice.get("type") == "function" and isinstance(name, str)):
        raise ParamError('"tool_choice" must be "none", "auto", "required" or {"type": "function", "function": '
                         '{"name": ...}}', "tool_choice")
    if name not in names:
        raise ParamError(f'"tool_choice" names the function {name!r}, which is not in "tools"', "tool_choice")
    return [t for t in out if t["function"]["name"] == name], "required"


def _call_schema(tools: list[dict]) -> dict:
    calls = [{"type": "object", "properties": {"name": {"const": t["function"]["name"]},
                                               "arguments": t["function"]["parameters"]},
              "required": ["name", "arguments"], "additionalProperties": False} for t in tools]
    return calls[0] if len(calls) == 1 else {"anyOf": calls}


def _call_grammar(tokenizer: Tokenizer, tools: list[dict], choice: str) -> Grammar:
    schema = _call_schema(tools)
    if choice != "auto":
        return grammar.json_schema(tokenizer, schema, strict=True, param="tools")
    # A call, or text whose first character is neither "{" nor blank (so the two never look alike).
    source = (f"start: call | text\ncall: %json {json.dumps(schema)}\n"
              f"text: /[^{{\\s](?s:.)*/\n")
    return grammar.lark(tokenizer, source, param="tools")


# ---- the prompt ---------------------------------------------------------------------------------------------


def render(tokenizer: Tokenizer, data: dict[str, Any], st: Structured | None) -> str:
    """``messages`` through the model's chat template, with the tools shown when calls are allowed, and
    earlier tool calls and tool results written so the template takes them."""
    messages = chat_messages(data)  # validates roles and contents; keeps only those
    native = bool(tokenizer.chat_template) and uses_tools(tokenizer.chat_template)
    for i, m in enumerate(data["messages"]):
        calls = m.get("tool_calls")
        if calls:
            parsed = _past_calls(calls, f"messages[{i}].tool_calls")
            if native:
                messages[i]["tool_calls"] = [{**c, "function": {**c["function"], "arguments": a}}
                                             for c, a in parsed]
            else:
                text = "\n".join(json.dumps({"name": c["function"]["name"], "arguments": a}, ensure_ascii=False)
                                 for c, a in parsed)
                messages[i]["content"] = f"{messages[i]['content']}\n{text}" if messages[i]["content"] else text
        for key in ("tool_call_id", "name"):
            if m.get("role") == "tool" and isinstance(m.get(key), str):
                messages[i][key] = m[key]
    tools = list(st.tools) if st is not None and st.calls else None
    if tools and not native:
        described = "\n".join(json.dumps({k: t["function"][k] for k in ("name", "description", "parameters")
                                          if k in t["function"]}, ensure_ascii=False) for t in tools)
        prompt = TOOLS_PROMPT.format(tools=described, rule=RULES[st.choice])
        if messages[0]["role"] == "system":
            messages[0]["content"] = f"{messages[0]['content']}\n\n{prompt}"
        else:
            messages.insert(0, {"role": "system", "content": prompt})
    try:
        return render_for(tokenizer, messages, tools=tools if native else None)
    except ShardllamaError as e:  # no template, or the template refused these messages: the request's fault
        hint = ": use /v1/completions" if not tokenizer.chat_template else ""
        raise ParamError(f"{e}{hint}", "messages") from None


def _past_calls(calls: Any, where: str) -> list[tuple[dict, Any]]:
    """An assistant message's ``tool_calls``, each with its arguments parsed from their JSON string."""
    if not isinstance(calls, list):
        raise ParamError(f'"{where}" must be a list, got {_kind(calls)}', where)
    out = []
    for j, c in enumerate(calls):
        f = c.get("function") if isinstance(c, dict) else None
        if not isinstance(f, dict) or not isinstance(f.get("name"), str) or not isinstance(f.get("arguments"), str):
            raise ParamError(f'"{where}[{j}]" must be {{"type": "function", "function": {{"name": str, '
                             '"arguments": str}}', f"{where}[{j}]")
        try:
            args = json.loads(f["arguments"])
        except ValueError:
            raise ParamError(f'"{where}[{j}].function.arguments" is not JSON', f"{where}[{j}].function.arguments") from None
        out.append(({"id": c.get("id"), "type": "function", "function": f}, args))
    return out


# ---- the answer ---------------------------------------------------------------------------------------------


def tool_call(st: Structured | None, text: str, finish_reason: str) -> list[dict] | None:
    """The answer as OpenAI's ``tool_calls``, if it is a finished call; else None (it is text)."""
    if st is None or not st.calls or finish_reason != "stop" or not text.startswith("{"):
        return None
    try:
        call = json.loads(text)
    except ValueError:
        return None
    return [{"id": f"call_{secrets.token_hex(12)}", "type": "function",
             "function": {"name": call["name"], "arguments": json.dumps(call["arguments"], ensure_ascii=False)}}]


def message(st: Structured | None, text: str, finish_reason: str) -> tuple[dict, str]:
    """The chat ``message`` and finish_reason of a whole answer."""
    calls = tool_call(st, text, finish_reason)
    if calls is None:
        return {"role": "assistant", "content": text}, finish_reason
    return {"role": "assistant", "content": None, "tool_calls": calls}, "tool_calls"


class Deltas:
    """One streamed choice's chat deltas: text as it comes, except a tool call (or what may become one),
    which is held and sent as one ``tool_calls`` delta at the end."""

    def __init__(self, st: Structured | None):
        self.st = st
        self.held: str | None = "" if st is not None and st.choice == "required" else None
        self.decided = st is None or not st.calls or st.choice == "required"

    def __call__(self, text: str | None, finish_reason: str | None) -> tuple[dict, str | None]:
        """``text`` (None at the end, with the ``finish_reason``) -> (delta fields, finish_reason)."""
        if text is not None:
            if not self.decided and text:
                self.decided = True
                self.held = "" if text.startswith("{") else None
            if self.held is not None or not self.decided:
                self.held = (self.held or "") + text
                return {}, None
            return ({"content": text} if text else {}), None
        if self.held is None:
            return {}, finish_reason
        calls = tool_call(self.st, self.held, finish_reason or "")
        if calls is None:
            return ({"content": self.held} if self.held else {}), finish_reason
        return {"tool_calls": [{"index": 0, **calls[0]}]}, "tool_calls"
