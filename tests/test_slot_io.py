"""Reading a KV-cache slot out of a backend and writing it into another (the prompt cache on disk needs it):
the coordinator assembles the full KV heads from its workers, so a state read with N workers continues
exactly in-process, and back."""

from __future__ import annotations

import pytest
import torch

from shardllama.backend import LocalBackend
from shardllama.config import ModelArgs
from shardllama.coordinator import Coordinator
from shardllama.model import Transformer, random_weights
from tests.helpers import seq_cache

# 9 query heads / 3 KV heads on 2 workers: worker 0 holds KV heads 0-1, worker 1 heads 1-2 (head 1 twice).
ARGS = ModelArgs(dim=36, n_layers=2, n_heads=9, n_kv_heads=3, vocab_size=53, hidden_dim=40, max_seq_len=16)
PROMPT = [3, 14, 15, 9, 2, 6, 5]


def test_a_slot_read_from_workers_continues_in_process_and_back():
    weights = random_weights(ARGS, seed=11)
    ref = Transformer(ARGS, weights, max_seq_len=16)
    cache = seq_cache(ref)
    ref.forward(torch.tensor([PROMPT]), cache)
    want_next = ref.forward(torch.tensor([[7]]), cache, start=torch.tensor([len(PROMPT)]))

    # In-process on blocks of 4 out of order: the state's layout does not depend on the cache's.
    local = LocalBackend(ARGS, weights, max_seq_len=16, n_blocks=8, block_size=4)
    table = [5, 2, 7, 0]
    with Coordinator(ARGS, weights, n_workers=2, max_seq_len=16, n_slots=3) as c:
        assert [s.kv_heads for s in c.specs] == [range(0, 2), range(1, 3)]
        c.forward(torch.tensor([PROMPT]), torch.tensor([0]), torch.tensor([1]))
        k, v = c.read_slot(1, len(PROMPT))
        assert k.shape == v.shape == (2, len(PROMPT), 3, ARGS.head_dim) and k.dtype == torch.float32
        want_k, want_v = cache.read([0], len(PROMPT))
        torch.testing.assert_close(k, want_k, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(v, want_v, rtol=1e-5, atol=1e-5)
        assert c.read_slot(1, 0)[0].shape == (2, 0, 3, ARGS.head_dim)

        # 2 workers -> in-process: the next token's logits are the reference's.
        local.write_blocks(table, k, v)
        got = local.forward(torch.tensor([[7]]), torch.tensor([len(PROMPT)]), torch.tensor([table]))
        torch.testing.assert_close(got, want_next, rtol=1e-4, atol=1e-4)

        # in-process -> 2 workers, into another slot; the original slot is untouched.
        lk, lv = local.read_blocks(table, len(PROMPT))
        c.write_slot(2, lk, lv)
        got = c.forward(torch.tensor([[7], [7]]), torch.tensor([len(PROMPT)] * 2), torch.tensor([2, 1]))
        torch.testing.assert_close(got, want_next.expand(2, -1), rtol=1e-4, atol=1e-4)

        with pytest.raises(ValueError, match="do not fit"):
            c.write_slot(0, k[:, :, :2], v[:, :, :2])  # missing a KV head
        with pytest.raises(ValueError, match="do not fit"):
            c.write_slot(0, k.half(), v.half())
        with pytest.raises(ValueError, match="outside"):
            c.read_slot(3, 1)
        # The workers carry on after refused requests.
        assert c.read_slot(2, 2)[0].shape == (2, 2, 3, ARGS.head_dim)


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


def test_slots_move_in_chunks_that_fit_a_frame(monkeypatch):
    """Whatever the frame bound, a slot read in chunks (runs of positions, or one layer of one position at a
    time) is the slot read at once, and writes back the same way."""
    from shardllama import tensor_frames

    weights = random_weights(ARGS, seed=12)
    with Coordinator(ARGS, weights, n_workers=2, max_seq_len=16, n_slots=3) as c:
        c.forward(torch.tensor([PROMPT]), torch.tensor([0]), torch.tensor([0]))
        k, v = c.read_slot(0, len(PROMPT))
        cell = 2 * 2 * ARGS.head_dim * 4  # a layer's keys and values at one position, 2 KV heads a worker, f32
        for payload in (3 * ARGS.n_layers * cell, cell):
            monkeypatch.setattr(tensor_frames, "MAX_PAYLOAD", payload)
            assert len(c.slots.chunks(len(PROMPT))) > 1
            k2, v2 = c.read_slot(0, len(PROMPT))
            assert torch.equal(k2, k) and torch.equal(v2, v)
            c.write_slot(1 + (payload == cell), k2, v2)
        monkeypatch.undo()
        for slot in (1, 2):
            k3, v3 = c.read_slot(slot, len(PROMPT))
            assert torch.equal(k3, k) and torch.equal(v3, v)
