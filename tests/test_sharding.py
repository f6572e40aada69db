"""The sharding plan: specs partition every axis, KV heads follow their query heads, shard/unshard round-trip;
shared memory and a worker loading its own weights hold the same slices."""

from __future__ import annotations

import os

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from shardllama.config import ModelArgs
from shardllama.errors import UsageError
from shardllama.model import expected_shapes, random_weights
from shardllama.sharding import ALIGN, PLAN, plan, plan_entry, shard, unshard, worker_weights
from shardllama.shm import ShardStore
from workers.shard import cut_weights


@st.composite
def configs(draw, max_layers: int = 2) -> ModelArgs:
    n_kv = draw(st.integers(1, 6))
    n_heads = n_kv * draw(st.integers(1, 4))
    head_dim = 2 * draw(st.integers(1, 4))
    return ModelArgs(
        dim=n_heads * head_dim,
        n_layers=draw(st.integers(1, max_layers)),
        n_heads=n_heads,
        n_kv_heads=n_kv,
        vocab_size=draw(st.integers(1, 300)),
        hidden_dim=draw(st.integers(1, 200)),
        tie_embeddings=draw(st.booleans()),
    )


@st.composite
def config_and_n(draw):
    args = draw(configs())
    return args, draw(st.integers(1, args.n_heads))


def _contiguous_partition(ranges: list[range], n: int) -> bool:
    return ranges[0].start == 0 and ranges[-1].stop == n and all(a.stop == b.start for a, b in zip(ranges, ranges[1:]))


@settings(max_examples=300, deadline=None)
@given(config_and_n())
def test_specs_partition_every_axis(case):
    args, n = case
    specs = plan(args, n)
    assert [s.rank for s in specs] == list(range(n))
    assert _contiguous_partition([s.q_heads for s in specs], args.n_heads)
    assert _contiguous_partition([s.ffn for s in specs], args.hidden_dim)
    assert _contiguous_partition([s.vocab for s in specs], args.vocab_size)
    q_sizes = [len(s.q_heads) for s in specs]
    assert min(q_sizes) >= 1 and max(q_sizes) - min(q_sizes) <= 1
    for axis, total in (("ffn", args.hidden_dim), ("vocab", args.vocab_size)):
        unit = next((a for a in ALIGN if total // a >= n), 1)
        sizes = [len(getattr(s, axis)) for s in specs]
        assert max(sizes[:-1] or [0]) - min(sizes) <= unit, (axis, sizes)
        assert sizes[-1] - min(sizes) < 2 * unit, (axis, sizes)
        assert all(getattr(s, axis).start % unit == 0 for s in specs), (axis, unit)


@settings(max_examples=300, deadline=None)
@given(config_and_n())
def test_every_query_head_finds_its_kv_head(case):
    args, n = case
    for s in plan(args, n):
        global_kv = [h // args.n_rep for h in s.q_heads]
        assert list(s.kv_heads) == sorted(set(global_kv)), "a worker holds exactly the KV heads it uses"
        assert [s.kv_heads.start + k for k in s.kv_of_q] == global_kv
        kv_map = s.kv_map()
        if kv_map is not None:
            assert kv_map.tolist() == list(s.kv_of_q)
        else:  # the plain grouping that model.attention falls back to
            group = len(s.q_heads) // len(s.kv_heads)
            assert list(s.kv_of_q) == [i // group for i in range(len(s.q_heads))]


@settings(max_examples=100, deadline=None)
@given(config_and_n(), st.sampled_from([torch.float32, torch.bfloat16]))
def test_unshard_of_shard_is_the_weight(case, dtype):
    args, n = case
    weights = random_weights(args, dtype)
    specs = plan(args, n)
    names = worker_weights(args)
    assert set(names.values()) | {"tok_embeddings.weight"} == set(expected_shapes(args))
    for name, src in names.items():
        parts = [shard(name, weights[src], s) for s in specs]
        assert torch.equal(unshard(name, parts, specs), weights[src]), name


@pytest.mark.parametrize("n, q, kv", [
    (2, [(0, 4), (4, 9)], [(0, 2), (1, 3)]),
    (4, [(0, 2), (2, 4), (4, 6), (6, 9)], [(0, 1), (0, 2), (1, 2), (2, 3)]),
    (5, [(0, 1), (1, 3), (3, 5), (5, 7), (7, 9)], [(0, 1), (0, 1), (1, 2), (1, 3), (2, 3)]),
])
def test_uneven_split_of_the_demo_model(n, q, kv):
    """SmolLM2-135M: 9 heads, 3 KV heads.  A KV head whose group straddles two workers is on both."""
    args = ModelArgs(dim=576, n_layers=1, n_heads=9, n_kv_heads=3, vocab_size=49152, hidden_dim=1536)
    specs = plan(args, n)
    assert [(s.q_heads.start, s.q_heads.stop) for s in specs] == q
    assert [(s.kv_heads.start, s.kv_heads.stop) for s in specs] == kv
    assert all(len(s.ffn) % 16 == 0 for s in specs[:-1])
    wq = torch.empty(9 * 64, 576, device="meta")
    assert [shard("layers.0.attention.wq.weight", wq, s).shape[0] for s in specs] == [64 * (b - a) for a, b in q]


@pytest.mark.parametrize("n", [0, -1, 10, 2.0, None])
def test_worker_count_out_of_range(n):
    args = ModelArgs(dim=576, n_layers=1, n_heads=9, n_kv_heads=3, vocab_size=10, hidden_dim=16)
    with pytest.raises(UsageError, match="between 1 and the model's 9 attention heads"):
        plan(args, n)


def test_table_covers_every_weight_and_nothing_else():
    args = ModelArgs(dim=8, n_layers=2, n_heads=2, n_kv_heads=1, vocab_size=5, hidden_dim=3)
    for name in expected_shapes(args):
        plan_entry(name)  # no KeyError
    assert {n.removeprefix("layers.1.") for n in expected_shapes(args) if "layers.0." not in n} == set(PLAN)
    with pytest.raises(KeyError):
        plan_entry("layers.0.attention.bias")
    with pytest.raises(KeyError, match="coordinator"):
        shard("tok_embeddings.weight", torch.zeros(5, 8), plan(args, 1)[0])


@pytest.mark.parametrize("tie", [False, True], ids=["untied", "tied"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.int8], ids=["f16", "int8"])
def test_remote_workers_cut_what_shared_memory_holds(dtype, tie):
    """A worker loading its own weights (``cut_weights``, what a tcp worker with --model-path runs) holds
    exactly the tensors the coordinator writes into shared memory for local workers: names, dtypes, bytes."""
    args = ModelArgs(dim=48, n_layers=2, n_heads=6, n_kv_heads=2, vocab_size=101, hidden_dim=80, tie_embeddings=tie)
    weights = random_weights(args, seed=4)
    specs = plan(args, 4)  # a KV head on two workers; uneven FFN and vocabulary ranges
    store = ShardStore.open(args, specs, dtype, weights.__getitem__, key=f"test-path-{os.getpid()}")
    try:
        for spec in specs:
            mine = cut_weights(args, spec, weights.__getitem__, dtype)
            theirs = store.segments[f"r{spec.rank}"].tensors()
            assert mine.keys() == theirs.keys() and "output.weight" in mine
            for name, t in mine.items():
                assert t.dtype == theirs[name].dtype and torch.equal(t, theirs[name]), name
    finally:
        store.close()
