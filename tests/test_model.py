"""The reference model against transformers' LlamaForCausalLM, and against itself (KV cache, batches)."""

import pytest
import torch
from hypothesis import given, settings, strategies as st

from shardllama.config import ModelArgs
from shardllama.model import Transformer, random_weights
from shardllama.kv_cache import blocks_for, contiguous_tables
from tests.helpers import hf_to_meta, seq_cache

transformers = pytest.importorskip("transformers")


@st.composite
def hf_configs(draw):
    head_dim = draw(st.sampled_from([4, 8, 16]))
    n_kv = draw(st.sampled_from([1, 2, 3]))
    n_heads = n_kv * draw(st.sampled_from([1, 2, 3]))  # rep 1 is multi-head attention
    return transformers.LlamaConfig(
        vocab_size=draw(st.integers(8, 120)),
        hidden_size=n_heads * head_dim,
        intermediate_size=draw(st.integers(4, 80)),
        num_hidden_layers=draw(st.integers(1, 3)),
        num_attention_heads=n_heads,
        num_key_value_heads=n_kv,
        rope_theta=draw(st.sampled_from([10000.0, 500.0, 100000.0])),
        rms_norm_eps=draw(st.sampled_from([1e-5, 1e-6])),
        max_position_embeddings=64,
        tie_word_embeddings=draw(st.booleans()),
    )


@settings(max_examples=25, deadline=None)
@given(config=hf_configs(), seed=st.integers(0, 2**16), n_tokens=st.integers(1, 12))
def test_logits_equal_transformers(config, seed, n_tokens):
    torch.manual_seed(seed)
    hf = transformers.LlamaForCausalLM(config).eval()
    args = ModelArgs.from_hf_config(config.to_dict())
    ref = Transformer(args, hf_to_meta(hf.state_dict(), args), max_seq_len=64)
    tokens = torch.randint(0, config.vocab_size, (2, n_tokens))
    with torch.no_grad():
        expected = hf(tokens).logits
    got = ref.forward(tokens, seq_cache(ref, 2), all_logits=True)
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("n_kv_heads", [4, 2, 1])
def test_incremental_decoding_equals_full_forward(n_kv_heads):
    args = ModelArgs(dim=64, n_layers=2, n_heads=4, n_kv_heads=n_kv_heads, vocab_size=97, hidden_dim=80, max_seq_len=32)
    ref = Transformer(args, random_weights(args, seed=1))
    tokens = torch.randint(0, 97, (3, 14))
    full = ref.forward(tokens, seq_cache(ref, 3), all_logits=True)
    cache = seq_cache(ref, 3)
    parts = [ref.forward(tokens[:, :5], cache, all_logits=True)]
    parts += [ref.forward(tokens[:, t : t + 1], cache, start=t, all_logits=True) for t in range(5, 14)]
    torch.testing.assert_close(torch.cat(parts, 1), full, atol=1e-5, rtol=1e-5)


def test_ragged_batch_equals_rows_alone():
    """Right-padded rows of different lengths, in slots out of order, decode as if each were alone."""
    args = ModelArgs(dim=48, n_layers=2, n_heads=6, n_kv_heads=2, vocab_size=50, hidden_dim=64, max_seq_len=32)
    ref = Transformer(args, random_weights(args, seed=2))
    rows = [torch.randint(0, 50, (n,)) for n in (7, 3, 5)]
    alone = []
    for row in rows:
        cache = seq_cache(ref)
        first = ref.forward(row[None], cache)
        second = ref.forward(torch.tensor([[11]]), cache, start=len(row))
        alone.append((first[0], second[0]))

    cache = seq_cache(ref, 4)
    tables = contiguous_tables(torch.tensor([3, 0, 2]), blocks_for(32))
    lengths = torch.tensor([len(r) for r in rows])
    padded = torch.nn.utils.rnn.pad_sequence(rows, batch_first=True, padding_value=1)
    first = ref.forward(padded, cache, tables=tables, lengths=lengths)
    second = ref.forward(torch.full((3, 1), 11), cache, start=lengths, tables=tables)
    for b, (f, s) in enumerate(alone):
        torch.testing.assert_close(first[b], f, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(second[b], s, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("dtype, tol", [(torch.float16, 2e-2), (torch.bfloat16, 6e-2)])
def test_half_precision_close_to_f32(dtype, tol):
    args = ModelArgs(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=80, hidden_dim=96, max_seq_len=32)
    w32 = random_weights(args, seed=3)
    ref32 = Transformer(args, w32)
    ref16 = Transformer(args, {k: v.to(dtype) for k, v in w32.items()})
    tokens = torch.randint(0, 80, (1, 9))
    a = ref32.forward(tokens, seq_cache(ref32), all_logits=True)
    b = ref16.forward(tokens, seq_cache(ref16), all_logits=True)
    assert b.dtype == torch.float32
    assert (a - b).abs().max() <= tol * a.abs().max()
