"""Text <-> token ids, on top of the engine (which only ever sees ids).

Four sources, one interface (:class:`Tokenizer`):

- a SentencePiece ``tokenizer.model`` (Meta's LLaMA 1/2 checkpoints), run by the ``sentencepiece`` package;
- a tiktoken ``tokenizer.model`` (Meta's Llama 3 checkpoints), run by ``tiktoken``: :mod:`.tiktoken_vocab`;
- an HF ``tokenizer.json``, run by the ``tokenizers`` package, with ``tokenizer_config.json`` /
  ``special_tokens_map.json`` / ``generation_config.json`` beside it read for BOS, EOS, stop ids and the
  chat template;
- the vocabulary embedded in a GGUF file.  llama.cpp stores the pieces, not a tokenizer, so a
  ``tokenizers.Tokenizer`` is assembled from them the way llama.cpp runs them: ``gpt2`` (byte-level BPE:
  tokens + merges, split first by a regex chosen by ``tokenizer.ggml.pre``) or ``llama`` (SentencePiece
  BPE: tokens + scores, ``<0xNN>`` byte tokens, ``▁`` for spaces, a space prefixed to each run of text).

Text passed to :meth:`Tokenizer.encode` may contain control tokens written out (``<|im_start|>``, ``<s>``),
as a rendered chat template does; they become their ids, like llama.cpp's ``parse_special`` and HF's
default.  :meth:`Tokenizer.decode` renders control tokens as nothing, like SentencePiece and llama.cpp.
"""

from __future__ import annotations

import abc
import logging
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import sentencepiece
import tokenizers

from .errors import ModelFileError, UnsupportedError, one_line
from .gguf_vocab import BYTE_PIECE, CHAR_BYTES
from .stream_decode import StreamDecoder  # re-exported: part of this module's API

log = logging.getLogger(__name__)

# Control tokens that end a turn, recognised by their text as llama.cpp does (llama-vocab.cpp, "EOG" ids).
STOP_TEXTS = frozenset({
    "<|endoftext|>", "<|im_end|>", "<|eot_id|>", "<|eom_id|>", "<|end_of_text|>", "<|end|>",
    "<end_of_turn>", "<EOT>", "<end_of_utterance>",
})



class Tokenizer(abc.ABC):
    """Text <-> ids.  Subclasses fill the attributes and implement ``_encode``, ``_decode``, ``_piece_bytes``."""

    kind: str  # "sentencepiece", "tiktoken", "tokenizer.json", "gguf-gpt2" or "gguf-llama"
    source: str  # the file it came from, for messages
    vocab_size: int
    bos_id: int | None
    eos_id: int | None
    add_bos: bool  # whether encode() prepends BOS by default (from the model's metadata)
    stop_ids: frozenset[int]  # EOS and the other control tokens that end a turn
    chat_template: str | None  # jinja source, carried for the chat layer, not rendered here

    def encode(self, text: str, bos: bool | None = None, *, special: bool = True) -> list[int]:
        """Ids of ``text``, with BOS first if ``bos`` (None: ``self.add_bos``).

        ``special``: control tokens written in the text (``<|im_end|>``) become their ids; pass False for
        untrusted text, where they are tokenized as plain characters.
        """
        ids = self._encode(text, special)
        if self.add_bos if bos is None else bos:
            if self.bos_id is None:
                raise UnsupportedError(f"{self.source}: the tokenizer has no BOS token")
            ids.insert(0, self.bos_id)
        return ids

    def decode(self, ids: Sequence[int]) -> str:
        """The text of ``ids``; control tokens (BOS, EOS...) render as nothing, unknown ids are skipped."""
        return self._decode([int(i) for i in ids if 0 <= int(i) < self.vocab_size])

    def token_text(self, id: int) -> str:
        """One token as printable text: ``" world"``, ``"<|im_end|>"``, a lone byte as ``"\\xe4"``."""
        id = int(id)
        if not 0 <= id < self.vocab_size:
            return ""
        return self._piece_bytes(id).decode("utf-8", "backslashreplace")

    def token_bytes(self, id: int) -> bytes:
        """One token's raw bytes (a lone byte of a multi-byte character as that byte); b"" outside the
        vocabulary.  The OpenAI API's ``bytes`` field."""
        id = int(id)
        return self._piece_bytes(id) if 0 <= id < self.vocab_size else b""

    def stream(self) -> StreamDecoder:
        return StreamDecoder(self)

    def __repr__(self) -> str:
        return (f"<{type(self).__name__} {self.kind} {self.source} vocab={self.vocab_size} bos={self.bos_id} "
                f"eos={self.eos_id} add_bos={self.add_bos} stop={sorted(self.stop_ids)}>")

    def _init_common(self, kind: str, source: str, vocab_size: int, bos_id: int | None, eos_id: int | None,
                     add_bos: bool | None, stop_ids: set[int], chat_template: str | None) -> None:
        self.kind, self.source, self.vocab_size = kind, source, vocab_size
        for name, value in (("BOS", bos_id), ("EOS", eos_id)):
            if value is not None and not 0 <= value < vocab_size:
                raise ModelFileError(f"{source}: {name} id {value} is outside the vocabulary (size {vocab_size})")
        self.bos_id, self.eos_id = bos_id, eos_id
        self.add_bos = bool(add_bos) and bos_id is not None
        self.stop_ids = frozenset(i for i in stop_ids | {eos_id} if i is not None and 0 <= i < vocab_size)
        self.chat_template = chat_template

    @abc.abstractmethod
    def _encode(self, text: str, special: bool) -> list[int]: ...

    @abc.abstractmethod
    def _decode(self, ids: list[int]) -> str: ...

    @abc.abstractmethod
    def _piece_bytes(self, id: int) -> bytes: ...


class SentencePieceTokenizer(Tokenizer):
    """A ``tokenizer.model``, run by the sentencepiece package."""

    def __init__(self, path: Path, config: Mapping[str, Any]):
        sp = sentencepiece.SentencePieceProcessor()
        try:
            sp.Load(str(path))
        except Exception as e:  # OSError / RuntimeError on a file that is not a model proto
            raise ModelFileError(f"{path}: not a readable SentencePiece model ({one_line(e)})") from None
        self._sp = sp
        n = sp.get_piece_size()
        control = [i for i in range(n) if sp.is_control(i) or sp.is_unknown(i)]
        pieces = sorted({sp.id_to_piece(i) for i in control} - {""}, key=len, reverse=True)
        self._special_re = re.compile("|".join(map(re.escape, pieces))) if pieces else None
        self._special_ids = {sp.id_to_piece(i): i for i in control}
        stops = {i for i in control if sp.id_to_piece(i) in STOP_TEXTS}
        bos, eos = sp.bos_id(), sp.eos_id()
        add_bos = config.get("add_bos_token")
        self._init_common("sentencepiece", str(path), n, bos if bos >= 0 else None, eos if eos >= 0 else None,
                          add_bos if isinstance(add_bos, bool) else True, stops, chat_template_of(config, path.parent))

    def _encode(self, text: str, special: bool) -> list[int]:
        if not special or self._special_re is None:
            return self._sp.encode(text)
        ids: list[int] = []
        start = 0
        # Each stretch between control tokens gets its own dummy-prefix space, as in llama.cpp.
        for m in self._special_re.finditer(text):
            if m.start() > start:
                ids += self._sp.encode(text[start:m.start()])
            ids.append(self._special_ids[m.group()])
            start = m.end()
        if start < len(text):
            ids += self._sp.encode(text[start:])
        return ids

    def _decode(self, ids: list[int]) -> str:
        return self._sp.decode(ids)

    def _piece_bytes(self, id: int) -> bytes:
        piece = self._sp.id_to_piece(id)
        if self._sp.is_byte(id):
            return bytes([int(piece[3:5], 16)])
        return piece.replace("▁", " ").encode()


class HFTokenizer(Tokenizer):
    """A ``tokenizers.Tokenizer``: from a tokenizer.json, or assembled from a GGUF vocabulary.

    ``spelling`` says how its pieces map to bytes, for token_text(): "byte-level" (GPT-2's table),
    "sentencepiece" (``▁`` and ``<0xNN>``) or "other" (ask the decoder).
    """

    def __init__(self, tk: tokenizers.Tokenizer, *, kind: str, source: str, spelling: str, vocab_size: int,
                 bos_id: int | None, eos_id: int | None, add_bos: bool | None, stop_ids: set[int],
                 chat_template: str | None):
        self._tk = tk
        self._plain_tk: tokenizers.Tokenizer | None = None  # a copy that reads control tokens as text
        self._spelling = spelling
        self._special = {i for i, t in tk.get_added_tokens_decoder().items() if t.special}
        self._init_common(kind, source, vocab_size, bos_id, eos_id, add_bos, stop_ids, chat_template)

    def _encode(self, text: str, special: bool) -> list[int]:
        tk = self._tk
        if not special:
            if self._plain_tk is None:
                self._plain_tk = tokenizers.Tokenizer.from_str(tk.to_str())
                self._plain_tk.encode_special_tokens = True
            tk = self._plain_tk
        # BOS is ours to add: a post-processor in tokenizer.json would add it a second time.
        return tk.encode(text, add_special_tokens=False).ids

    def _decode(self, ids: list[int]) -> str:
        return self._tk.decode(ids, skip_special_tokens=True)

    def _piece_bytes(self, id: int) -> bytes:
        piece = self._tk.id_to_token(id)
        if piece is None:
            return b""
        if id in self._special:
            return piece.encode()
        if self._spelling == "byte-level":
            if all(c in CHAR_BYTES for c in piece):
                return bytes(CHAR_BYTES[c] for c in piece)
            return piece.encode()
        if self._spelling == "sentencepiece":
            m = BYTE_PIECE.fullmatch(piece)
            return bytes([int(m.group(1), 16)]) if m else piece.replace("▁", " ").encode()
        return self._tk.decode([id], skip_special_tokens=False).encode()


# ---------------------------------------------------------------------------------------------------------
# Loading


def chat_template_of(config: Mapping[str, Any], directory: Path) -> str | None:
    """The chat template of a tokenizer_config.json (its default one), or of a chat_template.jinja beside it."""
    template = config.get("chat_template")
    if isinstance(template, list):  # [{"name": "default", "template": ...}, {"name": "tool_use", ...}]
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default", next(iter(named.values()), None))
    if template is None and (directory / "chat_template.jinja").is_file():
        template = (directory / "chat_template.jinja").read_text(encoding="utf-8")
    return template if isinstance(template, str) else None
