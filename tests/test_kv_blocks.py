"""The block-allocated KV cache: a sequence read and written through any block table — shuffled, shared with
another sequence, copied block by block, or sliced in place — computes what one contiguous run of positions
does."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings, strategies as st

from shardllama.config import ModelArgs
from shardllama.model import Step, Transformer, random_weights
from shardllama.kv_cache import BLOCK_SIZE, KVCache, blocks_for, contiguous_tables

MAX_SEQ = 20  # divisible by none of the block sizes below but 1, 4 and 5
ARGS = ModelArgs(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=50, hidden_dim=48, max_seq_len=MAX_SEQ)
REF = Transformer(ARGS, random_weights(ARGS, seed=5))
EXACT = dict(rtol=1e-6, atol=1e-6)  # the same math on the same numbers, gathered from other places


def run(passes, tables: torch.Tensor, n_blocks: int, block_size: int) -> list[torch.Tensor]:
    """Every pass's logits of every position, on a fresh cache, each pass (tokens, start, lengths)."""
    cache = REF.new_cache(n_blocks, block_size)
    return [REF.forward(t, cache, s, tables, n, all_logits=True) for t, s, n in passes]


@st.composite
def batches(draw):
    """A batch of right-padded prompts, a chunk more for each row from its own position, then decode steps."""
    B = draw(st.integers(1, 3))
    prompt = draw(st.lists(st.integers(1, 6), min_size=B, max_size=B))
    more = draw(st.lists(st.integers(1, 3), min_size=B, max_size=B))
    steps = draw(st.integers(1, 4))
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**16)))
    tokens = lambda T: torch.randint(0, ARGS.vocab_size, (B, T), generator=g)  # noqa: E731
    p, m = torch.tensor(prompt), torch.tensor(more)
    passes = [(tokens(max(prompt)), torch.zeros(B, dtype=torch.long), p), (tokens(max(more)), p, m)]
    passes += [(tokens(1), p + m + i, None) for i in range(steps)]
    return passes, B, draw(st.sampled_from([1, 3, 4, 5, 7, BLOCK_SIZE])), draw(st.randoms(use_true_random=False))


@settings(max_examples=40, deadline=None)
@given(batches())
def test_shuffled_tables_compute_what_contiguous_ones_do(case):
    passes, B, bs, rnd = case
    n = blocks_for(MAX_SEQ, bs)
    want = run(passes, contiguous_tables(torch.arange(B), n), B * n, bs)
    ids = list(range(B * n + 5))  # a pool with blocks to spare, handed out in any order
    rnd.shuffle(ids)
    got = run(passes, torch.tensor(ids[: B * n]).view(B, n), len(ids), bs)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, **EXACT)


def test_a_lone_sequence_on_consecutive_blocks_is_sliced_and_computes_what_a_gather_does():
    prompt = torch.randint(0, ARGS.vocab_size, (1, 9), generator=torch.Generator().manual_seed(1))
    rope, start = REF.rope, torch.tensor([0])
    assert Step.make(start, 9, torch.tensor([[3, 4, 5, 0]]), rope, 4).first == 12  # position 0 at block 3
    assert Step.make(start, 9, torch.tensor([[3, 5, 4, 0]]), rope, 4).first is None
    outs = []
    for table in ([3, 4, 5, 6, 7], [6, 3, 7, 0, 1]):
        cache = REF.new_cache(8, 4)
        tables = torch.tensor([table])
        out = [REF.forward(prompt, cache, 0, tables, all_logits=True)]
        out += [REF.forward(torch.tensor([[i + 1]]), cache, 9 + i, tables) for i in range(MAX_SEQ - 9)]
        outs.append(out)
    for a, b in zip(*outs):
        torch.testing.assert_close(a, b, **EXACT)


@pytest.mark.parametrize("bs", [3, 4])
def test_copied_blocks_continue_as_the_original(bs):
    """copy_block of each block (the last one in part) gives a second sequence that decodes as the first."""
    n, length = blocks_for(MAX_SEQ, bs), 10
    cache = REF.new_cache(2 * n, bs)
    a, b = list(range(n)), list(range(2 * n - 1, n - 1, -1))
    prompt = torch.randint(0, ARGS.vocab_size, (1, length), generator=torch.Generator().manual_seed(2))
    REF.forward(prompt, cache, 0, torch.tensor([a]))
    for j in range(blocks_for(length, bs)):
        cache.copy_block(a[j], b[j], min(bs, length - j * bs))
    tables = torch.tensor([a, b])
    for i in range(4):
        logits = REF.forward(torch.tensor([[7 + i]] * 2), cache, length + i, tables)
        torch.testing.assert_close(logits[1], logits[0], **EXACT)


@settings(max_examples=30, deadline=None)
@given(bs=st.integers(1, 6), length=st.integers(0, MAX_SEQ), rnd=st.randoms(use_true_random=False))
def test_read_and_write_round_trip_through_tables(bs, length, rnd):
    n = blocks_for(MAX_SEQ, bs)
    cache = KVCache(2, 2 * n, bs, 3, 4, torch.float32)
    ids = list(range(2 * n))
    rnd.shuffle(ids)
    src, dst = ids[:n], ids[n:]
    k, v = torch.randn(2, length, 3, 4), torch.randn(2, length, 3, 4)
    cache.write(src, k, v)
    for p in range(length):  # position p sits in block table[p // bs] at offset p % bs
        assert torch.equal(cache.k[:, src[p // bs], p % bs], k[:, p])
    got_k, got_v = cache.read(src, length)
    assert torch.equal(got_k, k) and torch.equal(got_v, v)
    cache.write(dst, got_k, got_v)
    assert all(torch.equal(x, y) for x, y in zip(cache.read(dst, length), (k, v)))


def test_a_state_moved_between_tables_continues_alike():
    n, length = blocks_for(MAX_SEQ, 4), 7
    cache = REF.new_cache(2 * n, 4)
    a, b = [5, 0, 3, 1, 2], [9, 6, 8, 4, 7]
    prompt = torch.randint(0, ARGS.vocab_size, (1, length), generator=torch.Generator().manual_seed(3))
    REF.forward(prompt, cache, 0, torch.tensor([a]))
    cache.write(b, *cache.read(a, length))
    logits = REF.forward(torch.tensor([[4], [4]]), cache, length, torch.tensor([a, b]))
    torch.testing.assert_close(logits[1], logits[0], **EXACT)


@pytest.mark.parametrize("bs", [4, 5])
def test_rows_sharing_prefix_blocks_compute_what_rows_with_copies_do(bs):
    """Two rows whose tables begin with the same blocks (a prompt prefix computed once) continue as two rows
    that each computed the prefix in blocks of their own."""
    n, shared = blocks_for(MAX_SEQ, bs), 2  # the prefix fills two blocks
    m = shared * bs
    g = torch.Generator().manual_seed(4)
    prefix = torch.randint(0, ARGS.vocab_size, (1, m), generator=g)
    rest = torch.randint(0, ARGS.vocab_size, (2, 3), generator=g)
    lengths = torch.tensor([3, 2])
    steps = [torch.randint(0, ARGS.vocab_size, (2, 1), generator=g) for _ in range(3)]

    def continue_(cache, tables):
        out = [REF.forward(rest, cache, torch.tensor([m, m]), tables, lengths, all_logits=True)]
        return out + [REF.forward(s, cache, m + lengths + i, tables) for i, s in enumerate(steps)]

    own = REF.new_cache(2 * n, bs)
    tables = contiguous_tables(torch.arange(2), n)
    REF.forward(prefix.expand(2, -1), own, 0, tables)
    want = continue_(own, tables)

    pool = REF.new_cache(2 * n, bs)
    REF.forward(prefix, pool, 0, torch.tensor([list(range(n))]))  # blocks 0 and 1 hold the prefix
    own_blocks = n - shared
    tail = list(range(2 * n - 1, 1, -1))  # the rest of the pool, each row its own
    tables = torch.tensor([[0, 1, *tail[:own_blocks]], [0, 1, *tail[own_blocks : 2 * own_blocks]]])
    got = continue_(pool, tables)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, **EXACT)


def test_tables_that_do_not_fit_are_refused():
    cache = REF.new_cache(4, 4)
    with pytest.raises(ValueError, match="outside the cache"):
        REF.forward(torch.tensor([[1]]), cache, 0, torch.tensor([[4]]))
    with pytest.raises(ValueError, match="beyond block tables of 1 blocks"):
        REF.forward(torch.tensor([[1, 2]]), cache, 3, torch.tensor([[0]]))
    with pytest.raises(ValueError, match="outside a cache of 4 blocks"):
        cache.copy_block(0, 4, 1)
    with pytest.raises(ValueError, match="outside a cache of 4 blocks"):
        cache.copy_block(0, 1, 5)
    assert cache.bytes_per_token() == 2 * ARGS.n_layers * ARGS.n_kv_heads * ARGS.head_dim * 4
    assert cache.nbytes() == 4 * 4 * cache.bytes_per_token()
