"""Constrained decoding: a grammar (a JSON schema, any JSON object, or a lark grammar) that masks each step's
logits so that only tokens continuing a sentence of the grammar can be drawn.

The matching is llguidance's (a Rust Earley parser over the tokenizer's byte trie), chosen by measurement
(``tools/bench_grammar.py``, ``tools/results/bench-grammar.md``): on the demo model's 49k vocabulary a mask
costs it tens of microseconds and a JSON schema compiles in about a millisecond, where xgrammar masks
faster but compiles each schema ten times slower and takes a second (and triton) to import.

:class:`Grammar` is compiled once per request (an error in it is a :class:`GrammarError` naming the field);
each generated sequence (each of ``n`` choices) gets its own :meth:`Grammar.constraint`, which the engine
calls each step (``engine/loop.py``'s ``_sample``): :meth:`Constraint.mask` on a copy of the logits
(the raw logits still give the log-probabilities), then :meth:`Constraint.accept` with the drawn token.

JSON is written with fixed separators (``", "``, ``": "``) and no other whitespace: a model cannot then
spend its budget on blank lines, and the output parses with any JSON reader.  Stop tokens (EOS, ``<|im_end|>``)
are allowed exactly where the grammar may end.
"""

from __future__ import annotations

import json
import threading
import weakref
from typing import Any

import llguidance
import torch

from .errors import UsageError
from .tokenizer import Tokenizer

# Applied over the schema's own "x-guidance" options: JSON without free whitespace.
JSON_OVERRIDES = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}

_SHIFTS = torch.arange(32, dtype=torch.int32)
_compiled: weakref.WeakKeyDictionary[Tokenizer, llguidance.LLTokenizer] = weakref.WeakKeyDictionary()
_lock = threading.Lock()


class GrammarError(UsageError):
    """A schema or grammar that cannot be compiled; ``param`` names the request field (HTTP 400)."""

    def __init__(self, message: str, param: str | None = None):
        super().__init__(message)
        self.param = param


class _Vocabulary:
    """What ``llguidance.TokenizerWrapper`` reads: each token's bytes (control tokens marked with a leading
    0xFF byte, llguidance's convention, so that no text can spell them) and a way to tokenize text."""

    def __init__(self, tokenizer: Tokenizer):
        self.eos_token_id = tokenizer.eos_id
        self.bos_token_id = tokenizer.bos_id
        control = tokenizer.control_ids
        self.tokens = [(b"\xff" if i in control else b"") + tokenizer.token_bytes(i)
                       for i in range(tokenizer.vocab_size)]
        self.special_token_ids = sorted(control)
        self._tokenizer = tokenizer
        self._ids: dict[bytes, int] = {}
        for i, piece in enumerate(self.tokens):
            self._ids.setdefault(piece, i)

    def __call__(self, text: bytes | str) -> list[int]:
        raw = text if isinstance(text, bytes) else text.encode()
        ids = self._tokenizer.encode(raw.decode("utf-8", "replace"), bos=False, special=False)
        # SentencePiece puts a space before the text ("{" -> "▁", "{"); llguidance wants the text's own
        # tokens (else it forces that space where the grammar allows none).
        if ids and not raw.startswith(b" ") and self.tokens[ids[0]].startswith(b" "):
            rest = self.tokens[ids[0]][1:]
            if not rest:
                ids = ids[1:]
            elif rest in self._ids:
                ids = [self._ids[rest], *ids[1:]]
        return ids


def compiled_tokenizer(tokenizer: Tokenizer) -> llguidance.LLTokenizer:
    """llguidance's view of ``tokenizer`` (a few hundred ms to build), once per tokenizer."""
    with _lock:
        ll = _compiled.get(tokenizer)
        if ll is None:
            if tokenizer.eos_id is None and not tokenizer.stop_ids:
                raise UsageError(f"{tokenizer.source}: the tokenizer has no end-of-text token, so a grammar "
                                 "could never end the output")
            wrapper = llguidance.TokenizerWrapper(_Vocabulary(tokenizer))
            ll = llguidance.LLTokenizer(wrapper, n_vocab=tokenizer.vocab_size,
                                        eos_token=sorted(tokenizer.stop_ids) or tokenizer.eos_id)
            _compiled[tokenizer] = ll
        return ll


class Grammar:
    """A compiled grammar for one tokenizer; :meth:`constraint` gives each sequence its own matcher."""

    def __init__(self, tokenizer: Tokenizer, source: str, *, param: str, what: str):
        self.tokenizer = tokenizer
        self._template = llguidance.LLMatcher(compiled_tokenizer(tokenizer), source, log_level=0)
        if self._template.is_error():
            error = self._template.get_error().strip().splitlines()
            raise GrammarError(f'"{param}": {what} cannot be used: {error[0] if error else "invalid"}', param)

    def constraint(self) -> Constraint:
        return Constraint(self._template.deep_copy(), self.tokenizer.vocab_size)


def json_schema(tokenizer: Tokenizer, schema: Any, *, strict: bool = True, param: str = "schema") -> Grammar:
    """Output that is one JSON value valid under ``schema``.  ``strict``: a keyword llguidance cannot
    enforce is an error (else it is ignored)."""
    if not isinstance(schema, dict):
        raise GrammarError(f'"{param}" must be a JSON schema object, got {type(schema).__name__}', param)
    try:
        source = llguidance.LLMatcher.grammar_from_json_schema(
            json.dumps(schema), defaults={"lenient": not strict}, overrides=JSON_OVERRIDES)
    except Exception as e:  # ValueError, or whatever else the library says of a schema it cannot read
        raise GrammarError(f'"{param}" is not a usable JSON schema ({e})', param) from None
    return Grammar(tokenizer, source, param=param, what="the JSON schema")


def json_object(tokenizer: Tokenizer, *, param: str = "response_format") -> Grammar:
    """Output that is one JSON object (OpenAI's ``{"type": "json_object"}``)."""
    return json_schema(tokenizer, {"type": "object"}, param=param)


def lark(tokenizer: Tokenizer, source: str, *, param: str = "grammar") -> Grammar:
    """Output that is a sentence of the lark grammar ``source`` (llguidance's dialect: ``%json {...}``
    embeds a JSON schema as a rule)."""
    if not isinstance(source, str) or not source.strip():
        raise GrammarError(f'"{param}" must be a non-empty lark grammar', param)
    return Grammar(tokenizer, llguidance.LLMatcher.grammar_from_lark(source), param=param, what="the grammar")


class Constraint:
    """One sequence's position in a grammar."""

    def __init__(self, matcher: llguidance.LLMatcher, n_vocab: int):
        self._matcher = matcher
        self._n = n_vocab
        self._bits = torch.zeros((n_vocab + 31) // 32, dtype=torch.int32)  # one bit per token

    def mask(self, logits: torch.Tensor) -> bool:
        """Set the logits (vocab,) of every token the grammar does not allow here to -inf, in place.
        False (logits untouched) if it allows none: the matcher failed, the sequence cannot go on."""
        if self._matcher.is_error():
            return False
        self._matcher.unsafe_compute_mask_ptr(self._bits.data_ptr(), self._bits.numel() * 4)
        allowed = ((self._bits[:, None] >> _SHIFTS) & 1).view(-1).bool()  # (words * 32,)
        keep = torch.zeros(logits.shape[-1], dtype=torch.bool)
        n = min(self._n, keep.numel())
        keep[:n] = allowed[:n]  # ids past the tokenizer's vocabulary (padding rows of the logits): never
        if not bool(keep.any()):
            return False
        logits.masked_fill_(~keep, -torch.inf)
        return True

    def accept(self, token: int) -> bool:
        """Advance past ``token`` (one :meth:`mask` allowed).  True when the grammar is done: nothing but a
        stop token may follow, so the sequence ends here as if the model had stopped."""
        if not self._matcher.consume_token(int(token)):
            return False  # the next mask() finds the error and ends the sequence
        return self._matcher.is_stopped()

    @property
    def complete(self) -> bool:
        """The output so far is a whole sentence of the grammar: a stop token is allowed now."""
        return self._matcher.is_accepting() or self._matcher.is_stopped()

    @property
    def error(self) -> str:
        return self._matcher.get_error() if self._matcher.is_error() else ""
