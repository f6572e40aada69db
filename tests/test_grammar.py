"""shardllama.grammar without a server: masks and accepts on a tiny byte-level vocabulary (256 byte tokens,
a few merged ones, control tokens), walked with random logits: every finished walk is valid JSON under its
schema, every masked token was allowed, and bad schemas are GrammarErrors naming the field."""

from __future__ import annotations

import json

import jsonschema
import pytest
import tokenizers
import torch
from tokenizers import decoders, models, pre_tokenizers

from shardllama import grammar
from shardllama.gguf_vocab import CHAR_BYTES
from shardllama.tokenizer import HFTokenizer

SCHEMA = {"type": "object", "properties": {
    "name": {"type": "string", "maxLength": 6}, "age": {"type": "integer", "minimum": 0, "maximum": 99},
    "tags": {"type": "array", "items": {"enum": ["a", "b"]}, "maxItems": 3}, "ok": {"type": "boolean"}},
    "required": ["name", "age"], "additionalProperties": False}


@pytest.fixture(scope="module")
def tokenizer() -> HFTokenizer:
    chars = sorted(CHAR_BYTES, key=CHAR_BYTES.get)
    vocab = {c: i for i, c in enumerate(chars)}
    merges = [("{", "Ġ"), ('"', ":"), ("t", "r"), ("tr", "u")]
    for a, b in merges:
        vocab[a + b] = len(vocab)
    tk = tokenizers.Tokenizer(models.BPE(vocab, merges))
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    tk.add_special_tokens(["<|endoftext|>", "<|im_start|>"])
    eos = tk.token_to_id("<|endoftext|>")
    return HFTokenizer(tk, kind="test", source="test", spelling="byte-level", vocab_size=tk.get_vocab_size(),
                       bos_id=None, eos_id=eos, add_bos=False, stop_ids={eos}, chat_template=None)


def test_token_bytes_and_control_ids(tokenizer):
    assert tokenizer.token_bytes(tokenizer.eos_id) == b"<|endoftext|>"
    assert tokenizer.control_ids == {tokenizer.eos_id, tokenizer.eos_id + 1}
    assert [tokenizer.token_bytes(i) for i in tokenizer.encode("tru", special=False)] == [b"tru"]  # merged
    assert sorted(tokenizer.token_bytes(i) for i in range(256)) == [bytes([b]) for b in range(256)]
    assert tokenizer.token_bytes(10**6) == b""


def walk(tokenizer, constraint, seed: int, extra: int = 0, steps: int = 200) -> tuple[list[int], bool]:
    """Draw tokens from random logits under ``constraint``; (tokens, ended by the grammar or a stop)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(steps):
        logits = torch.randn(tokenizer.vocab_size + extra, generator=g)
        raw = logits.clone()
        assert constraint.mask(logits)
        allowed = torch.isfinite(logits)
        assert not allowed[tokenizer.vocab_size:].any()  # padding ids past the vocabulary: never
        assert torch.equal(logits[allowed], raw[allowed])
        token = int(torch.multinomial(torch.softmax(logits, -1), 1, generator=g))
        done = constraint.accept(token)
        if token in tokenizer.stop_ids:
            return out, True
        out.append(token)
        if done:
            return out, True
    return out, False


def test_json_schema_walks_are_valid(tokenizer):
    g = grammar.json_schema(tokenizer, SCHEMA, param="response_format")
    finished = 0
    for seed in range(20):
        c = g.constraint()
        tokens, ended = walk(tokenizer, c, seed, extra=5)
        text = tokenizer.decode(tokens)
        if ended:
            finished += 1
            assert c.complete
            jsonschema.validate(json.loads(text), SCHEMA)
            assert "\n" not in text  # fixed separators, no free whitespace
    assert finished >= 10


def test_json_object_and_lark(tokenizer):
    c = grammar.json_object(tokenizer).constraint()
    assert not c.complete
    for t in tokenizer.encode('{"a": [1, true]}', special=False):
        assert c.accept(t) == (t == tokenizer.encode("}")[0])
    assert c.complete
    c = grammar.lark(tokenizer, 'start: "yes" | "no"').constraint()
    logits = torch.zeros(tokenizer.vocab_size)
    c.mask(logits)
    assert {tokenizer.decode([i]) for i in torch.nonzero(torch.isfinite(logits)).flatten().tolist()} == {"y", "n"}


def test_a_refused_token_ends_the_walk(tokenizer):
    c = grammar.json_object(tokenizer).constraint()
    assert not c.accept(tokenizer.encode("x")[0])
    logits = torch.zeros(tokenizer.vocab_size)
    assert not c.mask(logits) and c.error
    assert torch.equal(logits, torch.zeros(tokenizer.vocab_size))


@pytest.mark.parametrize("schema, words", [
    ({"type": "frobnicate"}, "frobnicate"), ([1], "schema object"), ({"$ref": "#/nope"}, "nope"),
    ({"type": "string", "pattern": "(("}, "regex"),
])
def test_bad_schemas_name_the_field(tokenizer, schema, words):
    with pytest.raises(grammar.GrammarError) as e:
        grammar.json_schema(tokenizer, schema, param="response_format")
    assert e.value.param == "response_format"
    assert str(e.value).startswith('"response_format"') and words in str(e.value) and "\n" not in str(e.value)


def test_the_compiled_tokenizer_is_kept(tokenizer):
    assert grammar.compiled_tokenizer(tokenizer) is grammar.compiled_tokenizer(tokenizer)


class Script:
    """A constraint that allows exactly ``tokens`` in turn, then nothing (``mask`` False) unless ``done_at``
    says accept() reports the grammar done after that many tokens."""

    def __init__(self, tokens: list[int], done_at: int | None = None):
        self.tokens, self.done_at, self.i, self.masked = tokens, done_at, 0, 0
        self.error = "script over"

    def mask(self, logits):
        if self.i >= len(self.tokens):
            return False
        keep = torch.zeros_like(logits, dtype=torch.bool)
        keep[self.tokens[self.i]] = True
        logits.masked_fill_(~keep, -torch.inf)
        self.masked += 1
        return True

    def accept(self, token):
        assert token == self.tokens[self.i]
        self.i += 1
        return self.i == self.done_at


def test_the_engine_masks_accepts_and_ends(tokenizer):
    from shardllama.backend import LocalBackend
    from shardllama.config import ModelArgs
    from shardllama.engine import Engine, Finished, Request, Token
    from shardllama.model import random_weights
    from shardllama.sampling import SamplingParams

    args = ModelArgs(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=97, hidden_dim=96, max_seq_len=64)
    engine = Engine(LocalBackend(args, random_weights(args, seed=3), max_seq_len=32, n_blocks=8), cache_size=1)

    def run(constraint, n=10):
        request = Request(prompt=[1, 5, 9], params=SamplingParams(temperature=1.0), emit=None, max_new_tokens=n,
                          max_len=32, logprobs=0, constraint=constraint, generator=torch.Generator().manual_seed(0))
        return list(engine.run(request))

    # Done after three tokens: the request ends there as if the model had stopped, without a fourth pass.
    script = Script([40, 41, 42], done_at=3)
    events = run(script)
    assert [e.id for e in events] == [40, 41, 42] and events[-1].is_end and events[-1].last
    assert script.masked == 3
    # The log-probabilities are the model's own: one allowed token would have log-probability 0.
    assert all(e.logprobs.logprob < -0.1 for e in events)
    # Nothing allowed after two tokens: the request ends cleanly, without a token.
    events = run(Script([7, 8]))
    assert [e.id for e in events if isinstance(e, Token)] == [7, 8] and isinstance(events[-1], Finished)
