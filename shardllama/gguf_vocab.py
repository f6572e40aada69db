"""Tokenizers assembled from the vocabulary a GGUF file embeds.

llama.cpp stores the pieces, not a tokenizer, so a ``tokenizers.Tokenizer`` is built from them the way
llama.cpp runs them: ``gpt2`` (byte-level BPE: tokens + merges, split first by a regex chosen by
``tokenizer.ggml.pre``) or ``llama`` (SentencePiece BPE: tokens + scores, ``<0xNN>`` byte tokens, ``▁`` for
spaces, a space prefixed to each run of text).  :mod:`shardllama.tokenizer` wraps the result.
"""

from __future__ import annotations

import logging
import re
import struct
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import tokenizers
from tokenizers import AddedToken, Regex, decoders, models, normalizers, pre_tokenizers

from .errors import ModelFileError, one_line

log = logging.getLogger(__name__)


# GGUF token types (llama.cpp's llama_token_type).
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6

# Pre-tokenizer split regexes for byte-level BPE vocabularies, by ``tokenizer.ggml.pre``; these are
# llama.cpp's (llm_tokenizer_bpe) in the form the models' own tokenizer.json files use.  "default" (a file
# whose converter did not know the model) is split as GPT-2, as transformers does; llama.cpp uses a legacy
# chain of four regexes there.  An unknown value falls back to GPT-2 with a warning.
_GPT2 = "gpt2"  # ByteLevel's built-in regex: 's|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+
_DIGITS_GPT2 = "digits+gpt2"  # every digit on its own first (HF Digits(individual_digits=True)), then GPT-2
_LLAMA3 = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
           r"|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2 = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
          r"|\s*[\r\n]+|\s+(?!\S)|\s+")
BPE_PRE = {
    **dict.fromkeys(["default", "gpt2", "mpt", "olmo", "jais"], _GPT2),
    **dict.fromkeys(["smollm", "starcoder", "refact", "command-r", "codeshell", "exaone", "minerva"], _DIGITS_GPT2),
    **dict.fromkeys(["llama3", "llama-bpe", "llama-v3", "dbrx", "smaug-bpe", "falcon3", "pixtral"], _LLAMA3),
    **dict.fromkeys(["qwen2", "stablelm2", "deepseek-r1-qwen"], _QWEN2),
}

BYTE_PIECE = re.compile(r"<0x([0-9A-Fa-f]{2})>")


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character table, in which byte-level BPE vocabularies are spelled."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table, extra = {b: chr(b) for b in keep}, 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + extra)
            extra += 1
    return table


BYTE_CHARS = _bytes_to_unicode()
CHAR_BYTES = {c: b for b, c in BYTE_CHARS.items()}
_BYTE_LEVEL_CHARS = frozenset(CHAR_BYTES)


def read_gguf_fields(path: Path) -> dict[str, Any]:
    from .loading.gguf_header import read_header  # numpy and gguf: only for GGUF files

    try:
        fields = read_header(path).fields
    except (ValueError, struct.error, OSError) as e:  # a short or bad file
        raise ModelFileError(f"{path}: not a readable GGUF file ({one_line(e)})") from None
    return {key: value for key, value in fields.items() if key.startswith("tokenizer.")}


def _add_marked_tokens(tk: tokenizers.Tokenizer, tokens: list[str], types: list[int], special: set[int]) -> None:
    """Tokens llama.cpp matches whole in text: control (and unknown) as special, user-defined as plain."""
    tk.add_special_tokens([AddedToken(tokens[i], special=True, normalized=False) for i in sorted(special)])
    tk.add_tokens([AddedToken(t, special=False, normalized=False)
                   for t, ty in zip(tokens, types) if ty == USER_DEFINED])


def gguf_byte_level(fields: Mapping[str, Any], tokens: list[str], types: list[int],
                     source: str) -> tokenizers.Tokenizer:
    merges = fields.get("tokenizer.ggml.merges")
    if not merges:
        raise ModelFileError(f"{source}: gpt2 GGUF tokenizer without merges (tokenizer.ggml.merges)")
    vocab: dict[str, int] = {}
    for i, (t, ty) in enumerate(zip(tokens, types)):
        if ty == NORMAL and not _BYTE_LEVEL_CHARS.issuperset(t):
            t = "".join(BYTE_CHARS[b] for b in t.encode())  # a piece stored as plain text: respell it
        vocab.setdefault(t, i)
    pairs = []
    for m in merges:
        left, sep, right = str(m).partition(" ")
        if not sep:
            raise ModelFileError(f"{source}: malformed merge {m!r} in tokenizer.ggml.merges")
        pairs.append((left, right))
    try:
        tk = tokenizers.Tokenizer(models.BPE(vocab=vocab, merges=pairs, fuse_unk=False, byte_fallback=False))
    except Exception as e:
        raise ModelFileError(f"{source}: inconsistent gpt2 GGUF vocabulary ({one_line(e)})") from None
    pre = str(fields.get("tokenizer.ggml.pre", "default"))
    split = BPE_PRE.get(pre)
    if split is None:
        log.warning("%s: unknown tokenizer.ggml.pre %r; splitting text as GPT-2 does", source, pre)
        split = _GPT2
    if split == _GPT2:
        tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    elif split == _DIGITS_GPT2:
        tk.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                                    pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)])
    else:
        tk.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(split), behavior="isolated"),
                                                    pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tk.decoder = decoders.ByteLevel()
    _add_marked_tokens(tk, tokens, types, {i for i, ty in enumerate(types) if ty == CONTROL})
    return tk


def gguf_sentencepiece(fields: Mapping[str, Any], tokens: list[str], types: list[int], unk: int | None,
                        source: str) -> tokenizers.Tokenizer:
    vocab: dict[str, int] = {}
    for i, t in enumerate(tokens):
        vocab.setdefault(t, i)
    merges = fields.get("tokenizer.ggml.merges")
    if merges:
        pairs = [tuple(str(m).split(" ", 1)) for m in merges]
    else:
        scores = fields.get("tokenizer.ggml.scores")
        if scores is None or len(scores) != len(tokens):
            raise ModelFileError(f"{source}: llama GGUF tokenizer without scores (tokenizer.ggml.scores)")
        pairs = _merges_from_scores(tokens, [float(s) for s in scores], types)
    unk_token = tokens[unk] if unk is not None else None
    try:
        bpe = models.BPE(vocab=vocab, merges=pairs, unk_token=unk_token, fuse_unk=True, byte_fallback=True)
    except Exception as e:
        raise ModelFileError(f"{source}: inconsistent llama GGUF vocabulary ({one_line(e)})") from None
    tk = tokenizers.Tokenizer(bpe)
    # As llama.cpp: spaces become '▁', and each stretch of text (the start, and after every control or
    # user-defined token) gets one '▁' in front, even when it already starts with a space -- which is
    # why this is a normalizer, not Metaspace (that one skips the prefix before an existing space).
    space_prefix = bool(fields.get("tokenizer.ggml.add_space_prefix", True))
    replace = normalizers.Replace(" ", "▁")
    tk.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), replace]) if space_prefix else replace
    steps = [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
    if space_prefix:
        steps.append(decoders.Strip(" ", 1, 0))
    tk.decoder = decoders.Sequence(steps)
    _add_marked_tokens(tk, tokens, types, {i for i, ty in enumerate(types) if ty in (CONTROL, UNKNOWN)})
    return tk


def _merges_from_scores(tokens: list[str], scores: list[float], types: list[int]) -> list[tuple[str, str]]:
    """BPE merges equivalent to SentencePiece's rule (merge the adjacent pair whose joined piece scores
    highest): every split of every normal piece into two normal pieces, best joined score first."""
    normal = {t: i for i, t in enumerate(tokens) if types[i] == NORMAL}
    found = []
    for piece, i in normal.items():
        for k in range(1, len(piece)):
            left, right = piece[:k], piece[k:]
            if left in normal and right in normal:
                found.append((-scores[i], normal[left], normal[right], left, right))
    found.sort()
    return [(left, right) for *_, left, right in found]
