"""The sharded engine against the reference model, and what happens when processes die.

Worker start-up (a Python process importing torch) is the slow part, so hypothesis draws few examples and
each example checks several things on one coordinator.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import psutil
import pytest
import torch
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from shardllama import chunked
from shardllama import protocol as P
from shardllama.backend import LocalBackend
from shardllama.config import ModelArgs
from shardllama.coordinator import Coordinator, default_workers
from shardllama.curve import make_keys
from shardllama.errors import UsageError, WorkerError
from shardllama.model import Transformer, random_weights
from shardllama.kv_cache import blocks_for, contiguous_tables
from shardllama.shm import SHM_DIR, clean_kept, list_kept, shard_key
from tests.helpers import seq_cache

REPO = Path(__file__).resolve().parents[1]
MAX_SEQ = 24
N_SLOTS = 3  # sequences of MAX_SEQ the tests' caches hold
BLOCKS = blocks_for(MAX_SEQ)  # of one sequence
# Sequence s of the tests lives in blocks SHUFFLE[s * BLOCKS : (s + 1) * BLOCKS]: out of order, so the workers
# follow block tables rather than assume a contiguous layout.
SHUFFLE = torch.randperm(N_SLOTS * BLOCKS, generator=torch.Generator().manual_seed(0))
ROW0 = torch.tensor([[0]])  # the block table of one row in block 0 (positions below BLOCK_SIZE)


def tables(slots) -> torch.Tensor:
    """The block tables (B, BLOCKS) of the tests' sequences ``slots`` (B,)."""
    return SHUFFLE[contiguous_tables(torch.as_tensor(slots), BLOCKS)]

# f32 must match to rounding; f16 / bf16 partial sums are rounded per worker, so they are compared
# relative to the size of the logits.
TOLERANCE = {torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 5e-2}


def assert_logits_close(got: torch.Tensor, want: torch.Tensor, dtype: torch.dtype) -> None:
    assert got.dtype == torch.float32 and got.shape == want.shape, (got.dtype, got.shape, want.shape)
    scale = 1.0 if dtype == torch.float32 else float(want.abs().max())
    err = float((got - want).abs().max())
    assert err <= TOLERANCE[dtype] * scale, f"{dtype}: max error {err:.3g} > {TOLERANCE[dtype]} x {scale:.3g}"


def _running(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def segments() -> set[str]:
    return {p.name for p in SHM_DIR.glob("shardllama-*")}


def own_segments() -> set[str]:
    """The private segments of coordinators in this process (named with its pid by segment.run_tag): other
    runs on the machine make and remove segments of their own meanwhile."""
    return {n for n in segments() if f"-{os.getpid()}-" in n}


def tiny_model(dtype=torch.float32, **kw) -> tuple[ModelArgs, dict[str, torch.Tensor]]:
    fields = dict(dim=24, n_layers=2, n_heads=6, n_kv_heads=2, vocab_size=61, hidden_dim=40, max_seq_len=MAX_SEQ)
    args = ModelArgs(**{**fields, **kw})
    return args, random_weights(args, dtype, seed=3)


def forward_both(c: Coordinator, ref: Transformer, cache, tokens, start, slots, lengths=None, all_logits=False):
    """The coordinator's and the reference's logits of one pass of sequences ``slots`` (in ``tables``)."""
    start, t = torch.as_tensor(start), tables(slots)
    return c.forward(tokens, start, t, lengths, all_logits), ref.forward(tokens, cache, start, t, lengths, all_logits)


def greedy(forward, prompt: list[int], steps: int) -> tuple[list[int], list[torch.Tensor]]:
    """An argmax loop of one sequence in blocks 0..; returns the tokens and each step's logits."""
    table = contiguous_tables(torch.tensor([0]), BLOCKS)
    logits = forward(torch.tensor([prompt]), torch.tensor([0]), table)
    tokens, seen = [], [logits]
    for i in range(steps):
        tokens.append(int(logits.argmax(-1)))
        logits = forward(torch.tensor([[tokens[-1]]]), torch.tensor([len(prompt) + i]), table)
        seen.append(logits)
    return tokens, seen


# ---- the sharded engine computes what the reference does -----------------------------------------------


@st.composite
def cases(draw):
    n_kv = draw(st.integers(1, 3))
    n_heads = n_kv * draw(st.integers(1, 3))
    head_dim = draw(st.sampled_from([2, 4, 8]))
    args = ModelArgs(
        dim=n_heads * head_dim, n_layers=draw(st.integers(1, 2)), n_heads=n_heads, n_kv_heads=n_kv,
        vocab_size=draw(st.integers(2, 50)), hidden_dim=draw(st.integers(1, 40)),
        tie_embeddings=draw(st.booleans()), max_seq_len=MAX_SEQ, rope_theta=draw(st.sampled_from([1e4, 1e5])),
    )
    n = draw(st.integers(1, min(6, n_heads)))
    dtype = draw(st.sampled_from([torch.float32, torch.float16, torch.bfloat16]))
    B = draw(st.integers(1, N_SLOTS))
    lengths = draw(st.lists(st.integers(1, 6), min_size=B, max_size=B))
    slots = draw(st.permutations(range(N_SLOTS)))[:B]
    prompt = draw(st.lists(st.integers(0, args.vocab_size - 1), min_size=1, max_size=5))
    return args, n, dtype, lengths, slots, prompt, draw(st.integers(0, 2**16))


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(cases())
def test_sharded_logits_equal_the_reference(case):
    args, n, dtype, lengths, slots, prompt, seed = case
    event(f"{n} workers, {str(dtype).removeprefix('torch.')}")
    weights = random_weights(args, dtype, seed=seed)
    ref = Transformer(args, weights, max_seq_len=MAX_SEQ)
    cache = seq_cache(ref, N_SLOTS)
    g = torch.Generator().manual_seed(seed)
    with Coordinator(args, weights, n_workers=n, dtype=dtype, max_seq_len=MAX_SEQ, n_blocks=N_SLOTS * BLOCKS) as c:
        # A batch of right-padded prompts of different lengths, every position's logits.
        B, T = len(lengths), max(lengths)
        tokens = torch.randint(0, args.vocab_size, (B, T), generator=g)
        lengths_t, slots_t = torch.tensor(lengths), torch.tensor(slots)
        got, want = forward_both(c, ref, cache, tokens, torch.zeros(B, dtype=torch.long), slots_t, lengths_t, True)
        assert_logits_close(got, want, dtype)
        # Then a few batched decode steps, every row at its own position.
        position = lengths_t.clone()
        for _ in range(3):
            nxt = torch.randint(0, args.vocab_size, (B, 1), generator=g)
            got, want = forward_both(c, ref, cache, nxt, position, slots_t)
            assert got.shape == (B, args.vocab_size)
            assert_logits_close(got, want, dtype)
            position += 1
        # Greedy generation: the same tokens, unless the reference itself had a near-tie there.
        ours, _ = greedy(c.forward, prompt, 4)
        ref_cache = seq_cache(ref)
        theirs, ref_logits = greedy(lambda t, s, sl: ref.forward(t, ref_cache, s), prompt, 4)
        for i, (a, b) in enumerate(zip(ours, theirs)):
            if a != b:
                top2 = ref_logits[i].topk(2).values[0]
                tol = TOLERANCE[dtype] * (1.0 if dtype == torch.float32 else float(ref_logits[i].abs().max()))
                assert float(top2[0] - top2[1]) <= 2 * tol, (ours, theirs)
                break


def test_demo_model_agrees_with_the_reference(demo_gguf):
    """The golden test on real weights: SmolLM2-135M (9 heads, 3 KV heads), two workers, so one KV head
    straddles them; greedy tokens identical, logits to f32 rounding."""
    from shardllama.loading import open_checkpoint, load_weights

    ckpt = open_checkpoint(demo_gguf)
    weights = load_weights(ckpt, torch.float32)
    ref = Transformer(ckpt.args, weights, max_seq_len=64)
    ref_cache = seq_cache(ref)
    prompt = [504, 3940, 282, 1029, 314]
    theirs, ref_logits = greedy(lambda t, s, sl: ref.forward(t, ref_cache, s), prompt, 8)
    with Coordinator(ckpt.args, weights, n_workers=2, max_seq_len=64) as c:
        ours, our_logits = greedy(c.forward, prompt, 8)
    assert ours == theirs
    for got, want in zip(our_logits, ref_logits):
        assert float((got - want).abs().max()) < 1e-3


@pytest.mark.parametrize("n, dtype", [(1, torch.float16), (2, torch.float32), (3, torch.bfloat16)])
def test_whole_passes_compute_exactly_what_the_star_does(n, dtype, monkeypatch):
    """Workers summing among themselves add the same partials in the same order and precision as the
    coordinator: bit-identical logits.  A prefill larger than the reduction buffers falls back to the star."""
    import shardllama.coordinator as coordinator

    monkeypatch.setattr(coordinator, "WHOLE_PASS_ROWS", 8)
    args, weights = tiny_model(dtype, n_heads=6, n_kv_heads=2, dim=24, n_layers=3)
    g = torch.Generator().manual_seed(n)
    prompts = torch.randint(0, args.vocab_size, (2, 6), generator=g)  # 12 rows: more than the buffers hold
    lengths, rows = torch.tensor([6, 4]), tables([1, 0])
    seen = {}
    for whole in (True, False):
        with Coordinator(args, weights, n_workers=n, dtype=dtype, max_seq_len=MAX_SEQ, n_blocks=N_SLOTS * BLOCKS,
                         whole_pass=whole) as c:
            assert c.whole_pass is whole
            out = [c.forward(prompts, torch.zeros(2, dtype=torch.long), rows, lengths, all_logits=True),
                   c.forward(prompts[:, :3], torch.zeros(2, dtype=torch.long), rows, all_logits=True),
                   c.forward(prompts[:1, :4], torch.tensor([3]), tables([2]))]
            position = lengths.clone()
            for i in range(3):  # batched decode, rows at different positions
                out.append(c.forward(prompts[:, i : i + 1], position, rows))
                position += 1
            seen[whole] = out
    for a, b in zip(seen[True], seen[False]):
        assert torch.equal(a, b)


def test_pieces_compute_what_one_pass_does():
    """A pass cut into runs of rows and positions (chunked prefill, so that every message fits a frame) gives
    one pass's logits: every row's last real token, padded rows ending in any run."""
    args, weights = tiny_model()
    tokens = torch.randint(0, args.vocab_size, (3, 7), generator=torch.Generator().manual_seed(1))
    start, lengths = torch.tensor([0, 0, 2]), torch.tensor([7, 2, 5])
    rows = tables([2, 0, 1])
    for all_logits in (False, True):
        whole = LocalBackend(args, weights, max_seq_len=MAX_SEQ, n_blocks=N_SLOTS * BLOCKS)
        cut = LocalBackend(args, weights, max_seq_len=MAX_SEQ, n_blocks=N_SLOTS * BLOCKS)
        want = whole.forward(tokens, start, rows, lengths, all_logits)
        got = chunked.forward(cut.forward, tokens, start, rows, lengths, all_logits, rows=2, positions=3)
        if all_logits:  # padding positions differ (each run pads its own way); real ones must not
            mask = torch.arange(7) < lengths[:, None]
            want, got = want[mask], got[mask]
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        nxt = torch.tensor([[1], [2], [3]])  # and the caches they left continue alike
        torch.testing.assert_close(cut.forward(nxt, start + lengths, rows), whole.forward(nxt, start + lengths, rows),
                                   rtol=1e-5, atol=1e-5)


def test_passes_bigger_than_a_frame_go_in_pieces(monkeypatch):
    args, weights = tiny_model()
    ref = Transformer(args, weights, max_seq_len=MAX_SEQ)
    cache = seq_cache(ref, N_SLOTS)
    monkeypatch.setattr(P, "MAX_PAYLOAD", 2 * args.dim * 4)  # two positions of h a message
    tokens = torch.randint(0, args.vocab_size, (3, 7), generator=torch.Generator().manual_seed(2))
    start, slots, lengths = torch.zeros(3, dtype=torch.long), torch.tensor([2, 0, 1]), torch.tensor([7, 2, 5])
    with Coordinator(args, weights, n_workers=2, max_seq_len=MAX_SEQ, n_blocks=N_SLOTS * BLOCKS) as c:
        got, want = forward_both(c, ref, cache, tokens, start, slots, lengths)
        assert_logits_close(got, want, torch.float32)
        nxt = torch.tensor([[1], [2], [3]])
        got, want = forward_both(c, ref, cache, nxt, lengths, slots)
        assert_logits_close(got, want, torch.float32)


def test_a_running_coordinators_segments_are_its_own_not_orphans():
    """`shardllama shards clean` removes orphans: the reduction segment of a live run must not look like one."""
    args, weights = tiny_model()
    with Coordinator(args, weights, n_workers=2, max_seq_len=MAX_SEQ) as c:
        mine = [g for g in list_kept() if g.owner_pid == os.getpid()]
        assert len(mine) == 1 and not mine[0].orphaned
        assert c._reduce_seg.name in mine[0].segments and len(mine[0].segments) == 4  # embedding, 2 shards, reduce


def test_copy_block_and_one_worker_per_head():
    args, weights = tiny_model(n_heads=3, n_kv_heads=1, dim=12)
    ref = Transformer(args, weights, max_seq_len=MAX_SEQ)
    cache = seq_cache(ref, N_SLOTS)
    prompt = torch.tensor([[5, 7, 11, 13]])
    with Coordinator(args, weights, n_workers=3, max_seq_len=MAX_SEQ, n_blocks=N_SLOTS * BLOCKS) as c:
        forward_both(c, ref, cache, prompt, [0], [0])
        src, dst = int(tables([0])[0, 0]), int(tables([2])[0, 0])
        c.copy_block(src, dst, 4)  # sequence 2 starts with sequence 0's first 4 positions
        cache.copy_block(src, dst, 4)
        got, want = forward_both(c, ref, cache, torch.tensor([[17]]), [4], [2])
        assert_logits_close(got, want, torch.float32)
        with pytest.raises(ValueError, match="outside the context"):
            c.forward(torch.tensor([[1]]), torch.tensor([MAX_SEQ]), tables([0]))
        with pytest.raises(ValueError, match="outside the cache's 6"):
            c.forward(torch.tensor([[1]]), torch.tensor([0]), torch.tensor([[N_SLOTS * BLOCKS]]))
        with pytest.raises(ValueError, match="at least 2 blocks"):
            c.forward(torch.tensor([[1]]), torch.tensor([BLOCKS * 8]), ROW0)  # a table too short for position 16
        with pytest.raises(ValueError, match="outside a cache of 6 blocks"):
            c.copy_block(0, 6, 1)
        with pytest.raises(ValueError, match="outside a cache"):
            c.copy_block(0, 1, 17)  # more than a block
        # The workers carry on.
        got, want = forward_both(c, ref, cache, torch.tensor([[19]]), [5], [2])
        assert_logits_close(got, want, torch.float32)


def test_bad_worker_counts_fail_before_anything_starts():
    args, weights = tiny_model()
    before = own_segments()
    for n in (0, args.n_heads + 1):
        with pytest.raises(UsageError, match="number of workers"):
            Coordinator(args, weights, n_workers=n)
    assert not own_segments() - before
    assert 1 <= default_workers() and default_workers(args) <= args.n_heads


# ---- failures ------------------------------------------------------------------------------------------


def _wait_dead(pid: int, timeout: float = 10) -> None:
    """Until ``pid`` has ended, all its threads too (its leader shows as a zombie a moment before the last
    thread exits, and only then can its parent collect it)."""
    deadline = time.monotonic() + timeout
    def threads() -> int:
        try:
            return len(os.listdir(f"/proc/{pid}/task"))
        except FileNotFoundError:
            return 0

    while _running(pid) or threads() > 1:
        assert time.monotonic() < deadline, f"pid {pid} did not die"
        time.sleep(0.01)


def test_workers_killed_while_idle_cost_no_request():
    """A worker that died between requests is noticed before the next one (its process state, no round trip)
    and replaced, so that request succeeds; only a sequence continued across the replacement is refused."""
    args, weights = tiny_model()
    ref = Transformer(args, weights, max_seq_len=MAX_SEQ)
    ref_cache = seq_cache(ref)
    want = greedy(lambda t, s, sl: ref.forward(t, ref_cache, s), [1, 2, 3], 3)[0]
    before = own_segments()
    with Coordinator(args, weights, n_workers=2, max_seq_len=MAX_SEQ, timeout=30) as c:
        mine = {s.name for s in c.store.segments.values()}
        assert mine <= own_segments()
        assert greedy(c.forward, [1, 2, 3], 3)[0] == want
        victim = c.pids[1]
        os.kill(victim, signal.SIGKILL)
        _wait_dead(victim)
        epoch = c.cache_epoch
        with pytest.raises(WorkerError, match=rf"row 0's first 6 positions was lost when worker 1 \(pid {victim}\) "
                                              r"was replaced \(died \(killed by SIGKILL\)\); start its sequence again"):
            c.forward(torch.tensor([[4]]), torch.tensor([6]), ROW0)
        assert c.cache_epoch == epoch + 1 and c.pids[1] != victim
        assert greedy(c.forward, [1, 2, 3], 3)[0] == want  # the replacement maps the same shards
        # Blocks written from position 0 since hold something again; the others do not.
        assert c.read_blocks([0], 6)[0].shape[1] == 6
        with pytest.raises(WorkerError, match="was lost when worker 1"):
            c.read_blocks([1], 1)
        with pytest.raises(WorkerError, match="block 1 was lost"):
            c.copy_block(1, 0, 3)
        c.copy_block(0, 1, 3)  # block 1 now holds block 0's first positions
        assert c.read_blocks([1], 3)[0].shape[1] == 3
        victims = list(c.pids)
        for pid in victims:  # both at once: still no request fails
            os.kill(pid, signal.SIGKILL)
        for pid in victims:
            _wait_dead(pid)
        assert greedy(c.forward, [1, 2, 3], 3)[0] == want
        assert not set(c.pids) & set(victims) and c.cache_epoch == epoch + 3
    assert not _running(victim) and not any(_running(p) for p in victims)
    assert not own_segments() - before and not mine & segments()


def test_a_worker_killed_during_a_pass_is_named_at_once_then_replaced():
    args, weights = tiny_model()
    with Coordinator(args, weights, n_workers=2, max_seq_len=MAX_SEQ, timeout=30) as c:
        c.forward(torch.tensor([[1, 2]]), torch.tensor([0]), ROW0)
        victim = c.pids[1]
        os.kill(victim, signal.SIGSTOP)  # it takes the pass's message, then dies in it
        killer = threading.Timer(0.5, os.kill, (victim, signal.SIGKILL))
        killer.start()
        t0 = time.monotonic()
        with pytest.raises(WorkerError, match=rf"worker 1 \(pid {victim}\) died \(killed by SIGKILL\)"):
            c.forward(torch.tensor([[1, 2]]), torch.tensor([0]), ROW0)
        killer.join()
        assert time.monotonic() - t0 < 5, "a dead worker must be noticed in seconds, not at the timeout"
        c.forward(torch.tensor([[1, 2]]), torch.tensor([0]), ROW0)
        assert c.pids[1] != victim


@pytest.mark.parametrize("whole", [True, False], ids=["whole-pass", "star"])
def test_a_silent_worker_is_named_at_the_timeout_then_replaced(whole):
    """SIGSTOP: named no earlier than --worker-timeout after the pass began, and well before 1.5x.  (In a whole
    pass the other worker publishes its partial sum; that is not progress while it waits on the silent one.)"""
    timeout = 2.0
    args, weights = tiny_model()
    with Coordinator(args, weights, n_workers=2, max_seq_len=MAX_SEQ, timeout=timeout, whole_pass=whole) as c:
        c.forward(torch.tensor([[1, 2]]), torch.tensor([0]), ROW0)
        stuck = c.pids[0]
        os.kill(stuck, signal.SIGSTOP)
        try:
            t0 = time.monotonic()
            with pytest.raises(WorkerError, match=rf"worker 0 \(pid {stuck}\) did not answer within 2 s"):
                c.forward(torch.tensor([[1, 2]]), torch.tensor([0]), ROW0)
            named = time.monotonic() - t0
            assert timeout <= named < 1.5 * timeout, named
            c.forward(torch.tensor([[1, 2]]), torch.tensor([0]), ROW0)  # the replacement
        finally:
            if psutil.pid_exists(stuck):
                os.kill(stuck, signal.SIGCONT)
        assert c.pids[0] != stuck


COORDINATOR_SCRIPT = textwrap.dedent("""
    import json, sys, time, torch
    from shardllama.config import ModelArgs
    from shardllama.coordinator import Coordinator
    from shardllama.model import random_weights
    args = ModelArgs(dim=16, n_layers=1, n_heads=4, n_kv_heads=2, vocab_size=11, hidden_dim=8, max_seq_len=8)
    with Coordinator(args, random_weights(args), n_workers=2, max_seq_len=8) as c:
        c.forward(torch.tensor([[1, 2]]), torch.tensor([0]), torch.tensor([[0]]))
        print(json.dumps({"pids": c.pids, "segments": [s.name for s in c.store.segments.values()],
                          "ipc": c.endpoint}), flush=True)
        while True:
            c.forward(torch.tensor([[3]]), torch.tensor([2]), torch.tensor([[0]]))
            time.sleep(0.01)
""")


@pytest.mark.parametrize("how", [signal.SIGKILL, signal.SIGINT])
def test_coordinator_death_leaves_nothing_behind(how):
    """SIGKILL: the workers notice the orphaning and the resource tracker unlinks the shards.
    SIGINT (Ctrl-C): KeyboardInterrupt unwinds through close()."""
    env = dict(os.environ, PYTHONPATH=str(REPO))
    proc = subprocess.Popen([sys.executable, "-c", COORDINATOR_SCRIPT], stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, env=env, text=True)
    try:
        info = json.loads(proc.stdout.readline())
        assert set(info["segments"]) <= segments()
        proc.send_signal(how)
        proc.wait(10)
        socket_file = Path(info["ipc"].removeprefix("ipc://"))
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            alive = [p for p in info["pids"] if _running(p)]
            if not alive and not set(info["segments"]) & segments() and not socket_file.parent.exists():
                break
            time.sleep(0.1)
        assert not alive, f"workers {alive} outlived their coordinator"
        assert not set(info["segments"]) & segments(), "shared memory left behind"
        assert not socket_file.parent.exists(), "ipc directory left behind"
    finally:
        if proc.poll() is None:
            proc.kill()


# ---- kept shards ---------------------------------------------------------------------------------------


def test_kept_shards_outlive_the_run_and_are_mapped_again(tmp_path):
    args, weights = tiny_model()
    model_file = tmp_path / "model.bin"
    model_file.write_bytes(b"stands for the checkpoint the shards were cut from")
    key = shard_key(model_file, torch.float32, 2)
    prompt = torch.tensor([[3, 1, 4, 1, 5]])
    try:
        with Coordinator(args, weights, n_workers=2, max_seq_len=MAX_SEQ, keep_shards=True, model_path=model_file) as c:
            first = c.forward(prompt, torch.tensor([0]), ROW0)
        kept = [i for i in list_kept() if i.key == key]
        assert len(kept) == 1 and kept[0].kept and kept[0].ready and len(kept[0].segments) == 3

        def must_not_load(name):
            raise AssertionError(f"kept shards were rebuilt (asked for {name})")

        with Coordinator(args, must_not_load, n_workers=2, max_seq_len=MAX_SEQ, keep_shards=True,
                         model_path=model_file) as c:
            assert not c.store.owned
            assert torch.equal(c.forward(prompt, torch.tensor([0]), ROW0), first)
        assert [i.key for i in list_kept() if i.key == key] == [key], "a run that did not make them keeps them"
        # A run that does not ask for kept shards never maps them: it writes private ones, removed after it.
        with Coordinator(args, weights, n_workers=2, max_seq_len=MAX_SEQ, model_path=model_file) as c:
            assert c.store.owned and not c.store.kept
            assert all(f"-{os.getpid()}-" in s.name for s in c.store.segments.values())
        assert [len(i.segments) for i in list_kept() if i.key == key] == [3]
    finally:
        removed = clean_kept(key)
    assert len(removed) == 3 and not any(i.key == key for i in list_kept())
    with pytest.raises(UsageError, match="model's path"):
        Coordinator(args, weights, n_workers=2, keep_shards=True)


# ---- remote workers over tcp ---------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_tcp_workers_load_their_own_shards(tmp_path):
    from shardllama.loading import open_checkpoint

    params = {"dim": 32, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2, "vocab_size": 53, "multiple_of": 16,
              "norm_eps": 1e-5, "rope_theta": 10000.0}
    (tmp_path / "params.json").write_text(json.dumps(params))
    args = ModelArgs.from_params_json(params)
    weights = random_weights(args, seed=7)
    torch.save(weights, tmp_path / "consolidated.00.pth")
    ckpt = open_checkpoint(tmp_path)
    args = ckpt.args.replace(max_seq_len=MAX_SEQ)
    tokens = torch.tensor([[2, 7, 1, 8], [2, 8, 1, 8]])
    start, rows = torch.zeros(2, dtype=torch.long), contiguous_tables(torch.tensor([0, 1]), BLOCKS)

    with Coordinator(args, weights, n_workers=2, max_seq_len=MAX_SEQ, n_blocks=2 * BLOCKS) as c:
        over_ipc = c.forward(tokens, start, rows, all_logits=True)

    port = _free_port()
    env = dict(os.environ, PYTHONPATH=str(REPO))
    keys = tmp_path / "keys"  # one keypair on both ends: CurveZMQ with nothing more to set up
    make_keys(keys)

    def start_remote() -> subprocess.Popen:
        remote.append(subprocess.Popen([sys.executable, "-m", "workers", "--connect", f"tcp://127.0.0.1:{port}",
                                        "--model-path", str(tmp_path), "--connect-timeout", "60",
                                        "--keys-dir", str(keys)], env=env))
        return remote[-1]

    remote: list[subprocess.Popen] = []
    try:
        for _ in range(2):
            start_remote()
        load = lambda name: ckpt.load(name, torch.float32)  # noqa: E731 -- the coordinator needs only the embedding
        with Coordinator(args, load, n_workers=2, max_seq_len=MAX_SEQ, n_blocks=2 * BLOCKS,
                         endpoint=f"tcp://127.0.0.1:{port}", connect_timeout=60, timeout=30, keys_dir=keys) as c:
            assert sorted(c.pids) == sorted(p.pid for p in remote)
            assert_logits_close(c.forward(tokens, start, rows, all_logits=True), over_ipc, torch.float32)
            # A remote worker that died while idle is noticed before the next request (its connection is gone),
            # which waits for a replacement to connect instead of failing.
            victim = remote[1]
            rank = c.pids.index(victim.pid)
            victim.kill()
            victim.wait()
            time.sleep(1)  # idle: long enough for the coordinator's ZeroMQ to see the connection close
            start_remote()
            assert_logits_close(c.forward(tokens, start, rows, all_logits=True), over_ipc, torch.float32)
            assert c.pids[rank] == remote[-1].pid
        for p in remote:
            if p is not victim:
                assert p.wait(10) == 0, "a remote worker exits cleanly when the coordinator closes"
    finally:
        for p in remote:
            if p.poll() is None:
                p.kill()
