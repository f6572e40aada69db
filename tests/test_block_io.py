"""Reading a sequence's cached positions out of a backend and writing them into another (the prompt cache on
disk needs it): the coordinator assembles the full KV heads from its workers, so a state read with N workers
continues exactly with any other N and in-process, and back, whatever blocks hold it."""

from __future__ import annotations

import pytest
import torch

from shardllama import protocol as P
from shardllama.backend import LocalBackend
from shardllama.config import ModelArgs
from shardllama.coordinator import Coordinator
from shardllama.model import Transformer, random_weights
from shardllama.runtime import kv_bytes_per_token
from tests.helpers import seq_cache

# 9 query heads / 3 KV heads on 2 workers: worker 0 holds KV heads 0-1, worker 1 heads 1-2 (head 1 twice).
ARGS = ModelArgs(dim=36, n_layers=2, n_heads=9, n_kv_heads=3, vocab_size=53, hidden_dim=40, max_seq_len=16)
PROMPT = [3, 14, 15, 9, 2, 6, 5]


def test_a_state_read_from_workers_continues_in_process_and_with_other_workers():
    weights = random_weights(ARGS, seed=11)
    ref = Transformer(ARGS, weights, max_seq_len=16)
    cache = seq_cache(ref)
    ref.forward(torch.tensor([PROMPT]), cache)
    want_next = ref.forward(torch.tensor([[7]]), cache, start=torch.tensor([len(PROMPT)]))
    want_k, want_v = cache.read([0], len(PROMPT))

    # In-process on blocks of 4 out of order: the state's layout does not depend on the cache's.
    local = LocalBackend(ARGS, weights, max_seq_len=16, n_blocks=8, block_size=4)
    table = [5, 2, 7, 0]
    # Two workers on blocks of 3, the prompt in blocks 6, 1, 4 (non-contiguous, not in order).
    with Coordinator(ARGS, weights, n_workers=2, max_seq_len=16, n_blocks=9, block_size=3) as c:
        assert [s.kv_heads for s in c.specs] == [range(0, 2), range(1, 3)]
        assert c.kv_bytes_per_token() == kv_bytes_per_token(ARGS, torch.float32, 2)  # head 1 counts twice
        assert c.kv_bytes_per_token() == 2 * 2 * 4 * ARGS.head_dim * 4
        seq = [6, 1, 4, 8, 0, 2]
        c.forward(torch.tensor([PROMPT]), torch.tensor([0]), torch.tensor([seq]))
        k, v = c.read_blocks(seq, len(PROMPT))
        assert k.shape == v.shape == (2, len(PROMPT), 3, ARGS.head_dim) and k.dtype == torch.float32
        torch.testing.assert_close(k, want_k, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(v, want_v, rtol=1e-5, atol=1e-5)
        assert c.read_blocks(seq, 0)[0].shape == (2, 0, 3, ARGS.head_dim)
        assert c.read_blocks(seq[1:3], 4)[0].shape == (2, 4, 3, ARGS.head_dim)  # a table of fewer blocks

        # 2 workers -> in-process: the next token's logits are the reference's.
        local.write_blocks(table, k, v)
        got = local.forward(torch.tensor([[7]]), torch.tensor([len(PROMPT)]), torch.tensor([table]))
        torch.testing.assert_close(got, want_next, rtol=1e-4, atol=1e-4)

        # in-process -> 2 workers, into other blocks; the original sequence is untouched.
        lk, lv = local.read_blocks(table, len(PROMPT))
        other = [3, 5, 7, 2, 0, 8]
        c.write_blocks(other, lk, lv)
        got = c.forward(torch.tensor([[7], [7]]), torch.tensor([len(PROMPT)] * 2), torch.tensor([other, seq]))
        torch.testing.assert_close(got, want_next.expand(2, -1), rtol=1e-4, atol=1e-4)

        with pytest.raises(ValueError, match="do not fit"):
            c.write_blocks(other, k[:, :, :2], v[:, :, :2])  # missing a KV head
        with pytest.raises(ValueError, match="do not fit"):
            c.write_blocks(other, k.half(), v.half())
        with pytest.raises(ValueError, match="do not fit a block table of 2 blocks of 3"):
            c.write_blocks(other[:2], k, v)
        with pytest.raises(ValueError, match="outside the cache's 9"):
            c.read_blocks([0, 9], 4)
        with pytest.raises(ValueError, match="outside the cache's 9"):
            c.read_blocks([-1], 1)
        with pytest.raises(ValueError, match="do not fit"):
            c.read_blocks([0], 4)
        # The workers carry on after refused requests.
        assert c.read_blocks(other, 2)[0].shape == (2, 2, 3, ARGS.head_dim)

    # 2 workers -> 3 workers (one KV head each), blocks of 16: the same logits.
    with Coordinator(ARGS, weights, n_workers=3, max_seq_len=16, n_blocks=2) as c3:
        assert c3.kv_bytes_per_token() == kv_bytes_per_token(ARGS, torch.float32, 3)
        c3.write_blocks([1], k, v)
        got = c3.forward(torch.tensor([[7]]), torch.tensor([len(PROMPT)]), torch.tensor([[1]]))
        torch.testing.assert_close(got, want_next, rtol=1e-4, atol=1e-4)
        k3, v3 = c3.read_blocks([1], len(PROMPT))
        assert torch.equal(k3[:, : len(PROMPT)], k) and torch.equal(v3, v)


def test_local_backend_refuses_a_state_that_does_not_fit():
    local = LocalBackend(ARGS, random_weights(ARGS), max_seq_len=4, n_blocks=2, block_size=4)
    k = torch.zeros(2, 5, 3, ARGS.head_dim)
    with pytest.raises(ValueError, match="do not fit"):
        local.write_blocks([1], k, k)  # 5 positions in a table of one block of 4
    with pytest.raises(ValueError, match="dtype"):
        local.write_blocks([1], k[:, :2].double(), k[:, :2].double())
    with pytest.raises(ValueError, match="outside"):
        local.write_blocks([2], k[:, :2], k[:, :2])  # a block the cache does not have
    with pytest.raises(ValueError, match="do not fit"):
        local.read_blocks([0], 5)


def test_states_move_in_chunks_that_fit_a_frame(monkeypatch):
    """Whatever the frame bound, a state read in chunks (runs of positions across blocks, or one layer of one
    position at a time) is the state read at once, and writes back the same way."""
    from shardllama import tensor_frames

    weights = random_weights(ARGS, seed=12)
    with Coordinator(ARGS, weights, n_workers=2, max_seq_len=16, n_blocks=12, block_size=2) as c:
        seq = [11, 3, 7, 0]
        c.forward(torch.tensor([PROMPT]), torch.tensor([0]), torch.tensor([seq]))
        k, v = c.read_blocks(seq, len(PROMPT))
        cell = 2 * 2 * ARGS.head_dim * 4  # a layer's keys and values at one position, 2 KV heads a worker, f32
        targets = {3 * ARGS.n_layers * cell: [1, 5, 9, 2], cell: [4, 6, 8, 10]}
        for payload, table in targets.items():
            monkeypatch.setattr(tensor_frames, "MAX_PAYLOAD", payload)
            assert len(c.blocks.chunks(len(PROMPT))) > 1
            k2, v2 = c.read_blocks(seq, len(PROMPT))
            assert torch.equal(k2, k) and torch.equal(v2, v)
            c.write_blocks(table, k2, v2)
        monkeypatch.undo()
        monkeypatch.setattr(P, "MAX_CHUNK_BLOCKS", 2)  # runs of one block's worth: 2 positions, 2 blocks at most
        assert [len(p) for _, p in c.blocks.chunks(len(PROMPT))] == [2, 2, 2, 1]
        k4, v4 = c.read_blocks(seq, len(PROMPT))
        assert torch.equal(k4, k) and torch.equal(v4, v)
        monkeypatch.undo()
        for table in targets.values():
            k3, v3 = c.read_blocks(table, len(PROMPT))
            assert torch.equal(k3, k) and torch.equal(v3, v)
