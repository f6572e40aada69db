"""Meta's Llama 3 ``tokenizer.model`` (tiktoken format), against the same vocabulary's ``tokenizer.json``.

A byte-level BPE is trained here by ``tokenizers`` with Llama 3's split pattern and written twice: as a
tiktoken ``tokenizer.model`` (base64 of each token's bytes, rank = id, Meta's layout: nothing beside it) and
as a ``tokenizers.Tokenizer`` with Llama 3's 256 special tokens added at the same ids and ``ignore_merges``
on, as HF's Llama 3 tokenizer.json has.  The two must tokenize alike: the trainer numbers each merged token
in merge order, so a lower rank is an earlier merge, which is the order tiktoken merges in (the fixture
checks that premise).  Also: transformers' own tiktoken converter reading our file, the chat format, a
chat session on a tiny model, and damaged files.
"""

from __future__ import annotations

import base64
import json
import random
import shutil
from pathlib import Path

import pytest
import tokenizers
from hypothesis import given
from hypothesis import strategies as st
from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers, trainers

from shardllama.chat_template import render, render_for
from shardllama.errors import ModelFileError
from shardllama.gguf_vocab import CHAR_BYTES
from shardllama.tiktoken_vocab import LLAMA3_CHAT_TEMPLATE
from shardllama.tokenizer import Tokenizer
from shardllama.tokenizer_files import load_tokenizer
from tests.test_tokenizer import SETTINGS, TEXT, TEXTS, WORDS, assert_one_line, stream_all

# Written out here from Meta's llama3 tokenizer.py (Llama 3.1), not imported, so the test checks the module's copy.
LLAMA3_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                  r"|\s*[\r\n]+|\s+(?!\S)|\s+")
LLAMA3_SPECIAL_TOKENS = [
    "<|begin_of_text|>", "<|end_of_text|>", "<|reserved_special_token_0|>", "<|reserved_special_token_1|>",
    "<|finetune_right_pad_id|>", "<|step_id|>", "<|start_header_id|>", "<|end_header_id|>", "<|eom_id|>",
    "<|eot_id|>", "<|python_tag|>", "<|image|>", *(f"<|reserved_special_token_{2 + i}|>" for i in range(256 - 12)),
]

N_RANKS = 600  # the trained vocabulary; special tokens follow at 600..855
BOS, EOS, START_HEADER, END_HEADER, EOM, EOT = 600, 601, 606, 607, 608, 609

MORE_TEXTS = TEXTS + [
    "I'm sure they'll say it's fine, DON'T you think? We've seen it.",
    "x  1 and  22 and\n 3 and\t\t4 and 1234567",
    "line one\r\n\r\n  indented line\n\n\n",
    "          ten spaces",
    "Ελληνικά, русский, עברית, العربية, हिन्दी, 한국어",
    "e\u0301 combining, ﬁ ligature, ½ ① Ⅻ, zero\u200bwidth\u00a0nbsp",
]

SPECIAL_PIECES = ["<|begin_of_text|>", "<|eot_id|>", "<|eom_id|>", "<|start_header_id|>", "<|end_header_id|>",
                  "<|end_of_text|>", "<|python_tag|>", "<|reserved_special_token_7|>", "<|eot_id", "<|", "|>"]

# Text with special tokens written into it, among arbitrary and multi-byte text.
TEXT_WITH_SPECIALS = st.lists(st.one_of(TEXT, st.sampled_from(SPECIAL_PIECES)), max_size=6).map("".join)

# meta-llama/Meta-Llama-3-8B-Instruct's tokenizer_config.json "chat_template".
HF_LLAMA3_TEMPLATE = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = '<|start_header_id|>' + "
    "message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}"
    "{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)


# --- fixtures -----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def trained() -> tokenizers.Tokenizer:
    """A byte-level BPE trained with Llama 3's split, ids 0..255 the bytes, 256.. the merges in order."""
    tk = tokenizers.Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(LLAMA3_PATTERN), "isolated"),
                                                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=N_RANKS, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    rng = random.Random(3)
    separators = [" ", " ", " ", "  ", "\n", "\n\n", ", ", ". ", "\t", ""]
    lines = ("".join(rng.choice(WORDS) + rng.choice(separators) for _ in range(12)) for _ in range(2000))
    tk.train_from_iterator(lines, trainer)
    merges = json.loads(tk.to_str())["model"]["merges"]
    vocab = tk.get_vocab()
    assert len(vocab) == N_RANKS
    for k, (left, right) in enumerate(merges):  # the premise: merge order = id order
        assert vocab[left + right] == 256 + k
    return tk


@pytest.fixture(scope="module")
def model_file(tmp_path_factory: pytest.TempPathFactory, trained: tokenizers.Tokenizer) -> Path:
    """The vocabulary as Meta ships Llama 3's: tokenizer.model alone, a line per token, in rank order."""
    ranks = sorted((i, bytes(CHAR_BYTES[c] for c in piece)) for piece, i in trained.get_vocab().items())
    path = tmp_path_factory.mktemp("llama3") / "tokenizer.model"
    path.write_bytes(b"".join(base64.b64encode(token) + b" %d\n" % rank for rank, token in ranks))
    return path


@pytest.fixture(scope="module")
def ref(trained: tokenizers.Tokenizer) -> tokenizers.Tokenizer:
    """The same vocabulary as HF's Llama 3 tokenizer.json has it: specials at the same ids, ignore_merges."""
    tk = tokenizers.Tokenizer.from_str(trained.to_str())
    tk.model.ignore_merges = True  # a pre-token that is a whole token stays one, as in tiktoken
    tk.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in LLAMA3_SPECIAL_TOKENS])
    assert tk.token_to_id("<|begin_of_text|>") == BOS and tk.get_vocab_size() == N_RANKS + 256
    return tk


@pytest.fixture(scope="module")
def ref_plain(ref: tokenizers.Tokenizer) -> tokenizers.Tokenizer:
    """``ref`` reading special tokens written in text as plain text."""
    tk = tokenizers.Tokenizer.from_str(ref.to_str())
    tk.encode_special_tokens = True
    return tk


@pytest.fixture(scope="module")
def tok(model_file: Path) -> Tokenizer:
    return load_tokenizer(model_file)


# --- the tokenizer ------------------------------------------------------------------------------------------


def test_metadata(tok: Tokenizer, model_file: Path) -> None:
    assert (tok.kind, tok.source, tok.vocab_size) == ("tiktoken", str(model_file), N_RANKS + 256)
    assert (tok.bos_id, tok.eos_id, tok.add_bos) == (BOS, EOS, True)
    assert tok.stop_ids == {EOS, EOM, EOT}  # base models end with <|end_of_text|>, instruct ones with eot/eom
    named = {t: tok.encode(t, bos=False) for t in ("<|start_header_id|>", "<|end_header_id|>", "<|python_tag|>",
                                                   "<|reserved_special_token_2|>", "<|reserved_special_token_245|>")}
    assert named == {"<|start_header_id|>": [START_HEADER], "<|end_header_id|>": [END_HEADER],
                     "<|python_tag|>": [610], "<|reserved_special_token_2|>": [612],
                     "<|reserved_special_token_245|>": [855]}
    assert [tok.token_text(i) for i in (BOS, EOT, 855)] == ["<|begin_of_text|>", "<|eot_id|>",
                                                            "<|reserved_special_token_245|>"]
    assert load_tokenizer(model_file.parent).kind == "tiktoken"  # a directory: finds tokenizer.model


@pytest.mark.parametrize("text", MORE_TEXTS)
def test_encode_decode_equal_tokenizer_json(tok: Tokenizer, ref: tokenizers.Tokenizer, text: str) -> None:
    ids = tok.encode(text, bos=False)
    assert ids == ref.encode(text, add_special_tokens=False).ids
    assert tok.decode(ids) == text == ref.decode(ids)
    assert tok.encode(text) == [BOS, *ids]
    if text.isascii():
        assert "".join(tok.token_text(i) for i in ids) == text


@given(text=TEXT_WITH_SPECIALS)
@SETTINGS
def test_encode_decode_equal_tokenizer_json_property(tok: Tokenizer, ref: tokenizers.Tokenizer,
                                                     ref_plain: tokenizers.Tokenizer, text: str) -> None:
    ids = tok.encode(text, bos=False)
    assert ids == ref.encode(text, add_special_tokens=False).ids
    assert tok.decode(ids) == ref.decode(ids, skip_special_tokens=True)
    plain = tok.encode(text, bos=False, special=False)
    assert plain == ref_plain.encode(text, add_special_tokens=False).ids
    assert all(i < N_RANKS for i in plain) and tok.decode(plain) == text


def test_special_tokens_in_text(tok: Tokenizer) -> None:
    text = "<|start_header_id|>user<|end_header_id|>\n\nWhat is <|eot_id|>?<|eot_id|>"
    ids = tok.encode(text, bos=False)
    assert ids[0] == START_HEADER and ids[-1] == EOT and ids.count(EOT) == 2 and END_HEADER in ids
    assert ids == [START_HEADER, *tok.encode("user", bos=False), END_HEADER, *tok.encode("\n\nWhat is ", bos=False),
                   EOT, *tok.encode("?", bos=False), EOT]
    assert tok.decode(ids) == "user\n\nWhat is ?"  # control tokens render as nothing
    plain = tok.encode(text, bos=False, special=False)  # untrusted text: the markup stays characters
    assert max(plain) < N_RANKS and tok.decode(plain) == text


def test_tokenizer_config_beside_overrides_bos_and_template(tmp_path: Path, model_file: Path) -> None:
    shutil.copy(model_file, tmp_path / "tokenizer.model")
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"add_bos_token": False, "chat_template": "T"}))
    tok = load_tokenizer(tmp_path / "tokenizer.model")
    assert tok.kind == "tiktoken" and not tok.add_bos and tok.chat_template == "T"
    assert tok.encode("hi") == tok.encode("hi", bos=False) and tok.encode("hi", bos=True)[0] == BOS


def test_same_ids_as_transformers_converter(monkeypatch: pytest.MonkeyPatch, model_file: Path, tok: Tokenizer) -> None:
    """transformers' TikTokenConverter (how HF's Llama 3 tokenizer.json was made) reading our file."""
    converter = pytest.importorskip("transformers.convert_slow_tokenizer").TikTokenConverter
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", "")  # tiktoken's reader would keep a copy in the temp directory
    hf = converter(vocab_file=str(model_file), pattern=LLAMA3_PATTERN,
                   extra_special_tokens=LLAMA3_SPECIAL_TOKENS).converted()
    for text in MORE_TEXTS + ["<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|>"]:
        assert tok.encode(text, bos=False) == hf.encode(text, add_special_tokens=False).ids, text


# --- streaming ----------------------------------------------------------------------------------------------


@given(data=st.data())
@SETTINGS
def test_stream_decode_random_ids(tok: Tokenizer, data: st.DataObject) -> None:
    """Any ids a model may produce: lone bytes in any order, special tokens anywhere."""
    ids = data.draw(st.lists(st.integers(0, tok.vocab_size - 1), max_size=30))
    assert "".join(stream_all(tok, ids)) == tok.decode(ids)


@given(text=TEXT_WITH_SPECIALS)
@SETTINGS
def test_stream_decode_text(tok: Tokenizer, text: str) -> None:
    ids = tok.encode(text)
    chunks = stream_all(tok, ids)
    assert "".join(chunks) == tok.decode(ids)
    if "\ufffd" not in text:
        assert not any("\ufffd" in c for c in chunks)


# --- chat ---------------------------------------------------------------------------------------------------

CONVERSATION = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": " Hi there \n"},
                {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "Bye"}]


def test_chat_format_without_a_shipped_template(tok: Tokenizer) -> None:
    assert tok.chat_template == LLAMA3_CHAT_TEMPLATE
    text = render_for(tok, CONVERSATION)
    assert text == ("<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nBe brief.<|eot_id|>"
                    "<|start_header_id|>user<|end_header_id|>\n\nHi there<|eot_id|>"
                    "<|start_header_id|>assistant<|end_header_id|>\n\nHello!<|eot_id|>"
                    "<|start_header_id|>user<|end_header_id|>\n\nBye<|eot_id|>"
                    "<|start_header_id|>assistant<|end_header_id|>\n\n")
    # The ids Meta's ChatFormat.encode_dialog_prompt builds, token by token.
    def piece(s: str) -> list[int]:
        return tok.encode(s, bos=False, special=False)

    expected = [BOS]
    for m in CONVERSATION + [{"role": "assistant", "content": None}]:
        expected += [START_HEADER, *piece(m["role"]), END_HEADER, *piece("\n\n")]
        if m["content"] is not None:
            expected += [*piece(m["content"].strip()), EOT]
    assert tok.encode(text, bos=False) == expected
    # The same text as HF's Llama 3 Instruct template, and no generation prompt when not asked for.
    for gen in (True, False):
        assert render_for(tok, CONVERSATION, add_generation_prompt=gen) == \
            render(HF_LLAMA3_TEMPLATE, CONVERSATION, add_generation_prompt=gen, bos_token="<|begin_of_text|>")


def test_chat_session_on_a_tiny_model(tok: Tokenizer) -> None:
    """`shardllama chat`'s session with the Llama 3 format: BOS once, headers as control tokens, the user's
    typed <|eot_id|> kept as text.  (A random model's answer may end in whitespace, which the format trims; the
    session then renders the conversation anew, so ``recomputed`` is not checked here.)"""
    from shardllama.backend import LocalBackend
    from shardllama.config import ModelArgs
    from shardllama.interactive import ChatSession, Session
    from shardllama.model import random_weights
    from shardllama.kv_cache import blocks_for
    from shardllama.sampling import SamplingParams

    args = ModelArgs(dim=32, n_layers=1, n_heads=2, n_kv_heads=1, vocab_size=tok.vocab_size, hidden_dim=64,
                     max_seq_len=256)
    backend = LocalBackend(args, random_weights(args, seed=3), max_seq_len=256, n_blocks=blocks_for(256) + 1)
    chat = ChatSession(Session(backend, tok, SamplingParams(temperature=0), max_new_tokens=4), "Be brief.")
    for line in ["Hi", "What is <|eot_id|>?"]:
        chat.turn(line)
    tokens = chat.session.tokens
    first = tok.encode(render_for(tok, chat.messages[:2]), bos=False)  # system + "Hi", the assistant header
    assert tokens[:len(first)] == first and tokens.count(BOS) == 1
    assert tokens.count(START_HEADER) == tokens.count(END_HEADER) == 5  # system, user, assistant, user, assistant
    typed = tok.encode("What is <|eot_id|>?", bos=False, special=False)
    assert any(tokens[i:i + len(typed)] == typed for i in range(len(tokens)))


# --- damaged files ------------------------------------------------------------------------------------------


def damaged(tmp_path: Path, model_file: Path, edit) -> Path:
    path = tmp_path / "tokenizer.model"
    path.write_bytes(edit(model_file.read_bytes()))
    return path


@pytest.mark.parametrize("case, edit, words", [
    ("truncated in a token", lambda b: b[:b.index(b"\n", len(b) // 2) + 3], ["line", "truncated"]),
    ("truncated in a rank", lambda b: b[:b.index(b" ", len(b) // 2) + 2], ["is missing", "truncated"]),
    ("garbled line", lambda b: b.replace(b"\n", b"\n@@ not base64\n", 1), ["line 2"]),
    ("a line lost", lambda b: b.replace(b.splitlines(keepends=True)[300], b"", 1), ["rank 300 is missing"]),
    ("a token twice", lambda b: b + b.splitlines(keepends=True)[300].replace(b" 300", b" 600"), ["appears twice"]),
    ("a byte without rank", lambda b: b"".join(base64.b64encode(bytes([i])) + b" %d\n" % i for i in range(255)),
     ["byte 0xff has no rank"]),
])
def test_damaged_file_is_a_one_line_error(tmp_path: Path, model_file: Path, case: str, edit, words: list[str]) -> None:
    path = damaged(tmp_path, model_file, edit)
    with pytest.raises(ModelFileError) as e:
        load_tokenizer(path)
    assert_one_line(e, path, *words)


def test_not_tiktoken_still_goes_to_sentencepiece(tmp_path: Path) -> None:
    path = tmp_path / "tokenizer.model"
    path.write_bytes(b"\n\x07garbage\x00\x01" * 10)  # a protobuf-like start, but no SentencePiece model
    with pytest.raises(ModelFileError) as e:
        load_tokenizer(path)
    assert_one_line(e, path, "SentencePiece")
