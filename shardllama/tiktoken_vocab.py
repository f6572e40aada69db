"""Meta's Llama 3 ``tokenizer.model``: a tiktoken BPE file, run by the ``tiktoken`` package.

The file holds only the byte-level BPE ranks, one ``<base64 of the token's bytes> <rank>`` per line (a
SentencePiece ``tokenizer.model`` is a protobuf binary, so the first line tells them apart).  The rest of
the tokenizer lives in Meta's code (llama3 ``tokenizer.py``) and is copied here: the pre-tokenizer split
pattern, 256 special tokens numbered from the number of ranks, BOS = ``<|begin_of_text|>``, and a turn ends
at ``<|end_of_text|>`` (base models), ``<|eot_id|>`` or ``<|eom_id|>`` (instruct models), so all three stop.
The special token names are Llama 3.1's; Llama 3.0's list gives the same ids to the ones that matter
(begin/end_of_text, start/end_header_id, eot_id).  Meta's chat format (its ``ChatFormat``) is the chat
template when no ``tokenizer_config.json`` / ``chat_template.jinja`` beside the file brings one.

Meta's reference cuts runs of over 25,000 whitespace or non-whitespace characters before encoding, against
old tiktoken versions that were slow or crashed on them; tiktoken 0.14 encodes a 200,000-character run in
under 0.2 s even with 20,000 merges over its letters (measured), so text goes to it whole.
"""

from __future__ import annotations

import base64
import binascii
import re
from pathlib import Path

import tiktoken

from .errors import ModelFileError, one_line
from .gguf_vocab import BPE_PRE
from .tokenizer import STOP_TEXTS, Tokenizer

LLAMA3_PATTERN = BPE_PRE["llama3"]  # llama.cpp's "llama3" split is Meta's pat_str

_NAMED = ["<|begin_of_text|>", "<|end_of_text|>", "<|reserved_special_token_0|>", "<|reserved_special_token_1|>",
          "<|finetune_right_pad_id|>", "<|step_id|>", "<|start_header_id|>", "<|end_header_id|>", "<|eom_id|>",
          "<|eot_id|>", "<|python_tag|>", "<|image|>"]
N_SPECIAL = 256
LLAMA3_SPECIAL_TOKENS = _NAMED + [f"<|reserved_special_token_{2 + i}|>" for i in range(N_SPECIAL - len(_NAMED))]

# Meta's ChatFormat.encode_dialog_prompt as a template: BOS, then each message as header + stripped content +
# <|eot_id|>, then the assistant's header for the model to complete.  (HF's Llama 3 Instruct template writes
# the same text, but leaves BOS out of an empty conversation.)
LLAMA3_CHAT_TEMPLATE = (
    "<|begin_of_text|>"
    "{% for message in messages %}"
    "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n'"
    " + message['content'] | trim + '<|eot_id|>' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}"
)

_LINE = re.compile(rb"([A-Za-z0-9+/]+={0,2}) ([0-9]+)")


def looks_like_tiktoken(head: bytes) -> bool:
    """Whether a file's first bytes are a tiktoken BPE line (a SentencePiece model starts with a protobuf tag)."""
    line = head.split(b"\n", 1)[0].rstrip(b"\r")
    return len(line) < len(head) and _LINE.fullmatch(line) is not None


def read_ranks(path: Path) -> dict[bytes, int]:
    """The token bytes -> rank table of a tiktoken file, checked: ranks 0..n-1, every single byte present.

    Read here rather than by ``tiktoken.load.load_tiktoken_bpe``, which caches a copy of the file under the
    system temp directory keyed by its path only, so a file replaced at the same path would read stale.
    """
    try:
        data = path.read_bytes()
    except OSError as e:
        raise ModelFileError(f"{path}: cannot read tokenizer file ({one_line(e)})") from None
    ranks: dict[bytes, int] = {}
    for number, line in enumerate(data.splitlines(), 1):
        if not line:  # tiktoken's own reader skips blank lines too
            continue
        m = _LINE.fullmatch(line)
        try:
            token = base64.b64decode(m.group(1), validate=True) if m else None
        except binascii.Error:
            token = None
        if token is None:
            raise ModelFileError(f"{path}: line {number} is not '<base64 token> <rank>' "
                                 "(a truncated or damaged tiktoken tokenizer.model?)")
        if token in ranks:
            raise ModelFileError(f"{path}: line {number}: token {token!r} appears twice")
        ranks[token] = int(m.group(2))
    n = len(ranks)
    if set(ranks.values()) != set(range(n)):
        missing = min(set(range(n)) - set(ranks.values()))
        raise ModelFileError(f"{path}: the {n} ranks are not 0..{n - 1} (rank {missing} is missing; "
                             "a truncated or damaged tiktoken tokenizer.model?)")
    lone = [b for b in range(256) if bytes([b]) not in ranks]
    if lone:  # tiktoken's encoder panics on a byte it cannot start from
        raise ModelFileError(f"{path}: not a byte-level BPE: byte 0x{lone[0]:02x} has no rank")
    return ranks


class TiktokenTokenizer(Tokenizer):
    """Meta's Llama 3 ``tokenizer.model``, run by tiktoken.  ``add_bos`` and ``chat_template`` come from a
    tokenizer_config.json beside the file when it has them (None: Meta's defaults)."""

    def __init__(self, path: Path, *, add_bos: bool | None = None, chat_template: str | None = None):
        ranks = read_ranks(path)
        self._n_ranks = n = len(ranks)
        special = {name: n + i for i, name in enumerate(LLAMA3_SPECIAL_TOKENS)}
        self._enc = tiktoken.Encoding(f"llama3:{path}", pat_str=LLAMA3_PATTERN, mergeable_ranks=ranks,
                                      special_tokens=special)
        stops = {special[name] for name in STOP_TEXTS & special.keys()}
        self._init_common("tiktoken", str(path), n + N_SPECIAL, special["<|begin_of_text|>"],
                          special["<|end_of_text|>"], True if add_bos is None else add_bos, stops,
                          chat_template or LLAMA3_CHAT_TEMPLATE)
        self.control_ids = frozenset(special.values())

    def _encode(self, text: str, special: bool) -> list[int]:
        if special:
            return self._enc.encode(text, allowed_special="all")
        return self._enc.encode(text, disallowed_special=())  # control tokens written out stay plain text

    def _decode(self, ids: list[int]) -> str:
        # Control tokens render as nothing; bytes -> text as UTF-8 with replacement, which StreamDecoder needs.
        return self._enc.decode_bytes([i for i in ids if i < self._n_ranks]).decode("utf-8", "replace")

    def _piece_bytes(self, id: int) -> bytes:
        return self._enc.decode_single_token_bytes(id)  # a special token: its text
