"""Overlap: chunked, asynchronous exchanges give the same outputs, bit for bit, and an honest trace."""

from __future__ import annotations

import threading
from collections.abc import Callable

import pytest
import torch

from engine.adapters import Task
from engine.codec import bits_for_budget
from engine.coded import chunk_bits
from engine.errors import BadRequest, FailureReason, GroupError
from engine.inputs import make_inputs
from engine.program import FAST_LINK_CHUNKS, FAST_LINK_SHARE, MAX_CHUNKS, chunks_for, plan_job
from engine.schedule import Step, steps
from engine.segments import Compression, Method
from engine.sim import run_local, run_simulated
from tests.conftest import Models, inputs_for, max_diff
from tests.test_rendezvous import form, relay_stores
from transport.gloo import GlooComm
from transport.localcluster import LocalCluster

CASES = [
    ("tiny-vit", Task.CLASSIFY, "logits"),
    ("tiny-bert", Task.EMBED, "embedding"),  # padded batch
    ("tiny-gpt2", Task.NEXT_TOKEN, "logits"),
]
COMPS = [
    Compression(),
    Compression(cr=4, keep_last=True),
    Compression(cr=8, method=Method.CODES),
    Compression(cr=4, wire_dtype="fp16"),
]


def same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# -- the order ----------------------------------------------------------------------------------
def test_without_overlap_each_layer_sends_then_finishes() -> None:
    order = list(steps(2, 1, overlap=False))
    assert order == [Step(True, 0, 0), Step(False, 0, 0), Step(True, 1, 0), Step(False, 1, 0)]


def test_with_overlap_a_chunks_next_layer_leaves_before_the_other_chunks_finish() -> None:
    order = list(steps(2, 2, overlap=True))
    assert order == [
        Step(True, 0, 0),
        Step(True, 0, 1),
        Step(False, 0, 0),
        Step(True, 1, 0),
        Step(False, 0, 1),
        Step(True, 1, 1),
        Step(False, 1, 0),
        Step(False, 1, 1),
    ]
    for layers, chunks in [(1, 1), (3, 4), (12, 3)]:
        order = list(steps(layers, chunks, overlap=True))
        assert sorted(order, key=lambda s: (s.layer, s.chunk, not s.send)) == sorted(
            (Step(send, i, c) for i in range(layers) for c in range(chunks) for send in (True, False)),
            key=lambda s: (s.layer, s.chunk, not s.send),
        )
        for c in range(chunks):  # per chunk: layers in order, each sent before it finishes
            mine = [(s.layer, not s.send) for s in order if s.chunk == c]
            assert mine == sorted(mine)


def test_plan_job_overlaps_by_default_and_checks_chunks(models: Models) -> None:
    adapter = models("tiny-bert").adapter
    inputs = inputs_for("bert", batch=6)
    spec = plan_job(adapter, "tiny-bert", Task.EMBED, inputs, ranks=2, comp=Compression(cr=4))
    assert (spec.overlap, spec.chunks) == (True, min(6, MAX_CHUNKS))
    assert [s.stop - s.start for s in spec.chunk_slices] == [2, 2, 1, 1]
    off = plan_job(adapter, "tiny-bert", Task.EMBED, inputs, ranks=2, comp=Compression(cr=4), overlap=False)
    assert (off.overlap, off.chunks) == (False, 1)
    with pytest.raises(BadRequest, match=r"chunks must be 1\.\.6"):
        plan_job(adapter, "tiny-bert", Task.EMBED, inputs, ranks=2, comp=Compression(cr=4), chunks=7)


@pytest.mark.parametrize(
    ("batch", "link_ms", "compute_ms", "chunks"),
    [
        (8, 25.0, 800.0, FAST_LINK_CHUNKS),  # vit-base b8 kv@4 unshaped: nothing to hide, fewer chunks
        (8, 580.0, 1100.0, MAX_CHUNKS),  # kv@4 at 100 Mbit/s: the exchange needs the longer window
        (8, FAST_LINK_SHARE * 800.0, 800.0, MAX_CHUNKS),  # at the share itself: the default
        (8, None, 800.0, MAX_CHUNKS),  # an unknown link, or no prediction: the default
        (8, 25.0, None, MAX_CHUNKS),
        (1, 1.0, 800.0, 1),  # never more chunks than samples
        (3, 1.0, 800.0, 2),
    ],
)
def test_a_fast_link_runs_in_fewer_chunks(
    batch: int, link_ms: float | None, compute_ms: float | None, chunks: int
) -> None:
    assert chunks_for(batch, link_ms, compute_ms) == chunks


# -- the numbers --------------------------------------------------------------------------------
@pytest.mark.parametrize(("name", "task", "key"), CASES)
@pytest.mark.parametrize("comp", COMPS, ids=lambda c: c.label())
def test_overlap_changes_no_output_bit_in_process(
    models: Models, name: str, task: Task, key: str, comp: Compression
) -> None:
    adapter = models(name).adapter
    inputs = inputs_for(adapter.family, batch=5)
    whole = run_simulated(adapter, plan_job(adapter, name, task, inputs, ranks=3, comp=comp, overlap=False), inputs)
    for chunks in (1, 2, 5):
        on = plan_job(adapter, name, task, inputs, ranks=3, comp=comp, chunks=chunks, gather_hidden=True)
        off = plan_job(
            adapter, name, task, inputs, ranks=3, comp=comp, chunks=chunks, overlap=False, gather_hidden=True
        )
        got, ref = run_simulated(adapter, on, inputs), run_simulated(adapter, off, inputs)
        assert same(got.outputs, ref.outputs), chunks
        assert [t.exchange_bytes_sent for t in got.traces] == [t.exchange_bytes_sent for t in ref.traces]
        assert got.exchange_bytes == whole.exchange_bytes
        # Smaller GEMMs may round differently (D = 64 here); nothing more than that.
        assert max_diff(got.outputs[key], whole.outputs[key]) <= 1e-5


@pytest.mark.parametrize("name", ["bert-base", "vit-base"])
def test_overlap_is_bit_exact_on_base_models(models: Models, name: str) -> None:
    model = models(name)
    adapter = model.adapter
    inputs = make_inputs(model, 3, 40 if adapter.family == "bert" else None)
    task = adapter.default_task()
    for comp in (Compression(cr=9.9), Compression(cr=9.9, method=Method.CODES)):
        on = run_simulated(adapter, plan_job(adapter, name, task, inputs, ranks=2, comp=comp, chunks=3), inputs)
        off = plan_job(adapter, name, task, inputs, ranks=2, comp=comp, chunks=3, overlap=False)
        assert same(on.outputs, run_simulated(adapter, off, inputs).outputs)
        whole = plan_job(adapter, name, task, inputs, ranks=2, comp=comp, overlap=False)
        assert max_diff(on.outputs["logits"], run_simulated(adapter, whole, inputs).outputs["logits"]) <= 1e-5


def test_full_exchange_with_overlap_is_the_plain_model(models: Models) -> None:
    adapter = models("tiny-bert").adapter
    inputs = inputs_for("bert", batch=4)
    ref = run_local(adapter, Task.EMBED, inputs).outputs
    spec = plan_job(adapter, "tiny-bert", Task.EMBED, inputs, ranks=2, comp=Compression(), chunks=4)
    assert max_diff(run_simulated(adapter, spec, inputs).outputs["embedding"], ref["embedding"]) <= 1e-4


def test_a_chunk_of_a_codes_payload_keeps_every_rows_width() -> None:
    """Rows j * B + s of the whole payload; its first k are one bit wider."""
    for batch, n, k in [(8, 5, 0), (8, 5, 13), (3, 7, 20), (5, 2, 10), (4, 3, 11)]:
        whole = bits_for_budget(batch * n, 64, 10**6)  # 8 bits, k = 0: only the shape matters here
        whole = type(whole)(batch * n, 64, 3, k)
        wide = {(j, s) for j in range(n) for s in range(batch) if j * batch + s < k}
        for chunk in (slice(0, batch), slice(0, 1), slice(1, batch), slice(batch // 2, batch)):
            size = chunk.stop - chunk.start
            bits = chunk_bits(whole, batch, chunk)
            mine = [(j, s) for j in range(n) for s in range(chunk.start, chunk.stop)]  # the chunk's own order
            assert bits.rows == size * n
            assert [row in wide for row in mine] == [r < bits.k for r in range(bits.rows)]


# -- over GLOO ----------------------------------------------------------------------------------
@pytest.mark.gloo
@pytest.mark.parametrize(("name", "task", "key"), CASES)
@pytest.mark.parametrize("comp", COMPS, ids=lambda c: c.label())
def test_gloo_with_overlap_equals_in_process_and_no_overlap(
    cluster: LocalCluster, models: Models, name: str, task: Task, key: str, comp: Compression
) -> None:
    model = models(name)
    inputs = inputs_for(model.adapter.family, batch=4)
    on = plan_job(model.adapter, name, task, inputs, ranks=3, comp=comp, chunks=2)
    off = plan_job(model.adapter, name, task, inputs, ranks=3, comp=comp, chunks=2, overlap=False)
    sim = run_simulated(model.adapter, on, inputs)
    real_on = cluster.run(model, on, inputs)
    real_off = cluster.run(model, off, inputs)
    assert same(real_on.outputs, real_off.outputs)
    # GLOO sums the partials in its own order (and ranks run on other threads): the last bit may differ.
    assert max_diff(real_on.outputs[key], sim.outputs[key]) <= 1e-5
    assert [t.exchange_bytes_sent for t in real_on.traces] == [t.exchange_bytes_sent for t in sim.traces]
    assert [t.exchange_bytes_recv for t in real_on.traces] == [t.exchange_bytes_recv for t in sim.traces]
    for t_on, t_off in zip(real_on.traces, real_off.traces, strict=True):
        assert t_on.rounds == t_off.rounds
        assert t_off.hidden_rounds == 0
        # Time is never booked twice: compute, waiting and staging fit in the wall time.
        assert t_on.compute_s + t_on.comm_s + t_on.staging_s <= t_on.wall_s + 1e-6
        assert t_on.overlap_s > 0.0
        assert t_on.link_s == t_on.comm_s + t_on.overlap_s
        assert t_off.overlap_s == 0.0  # blocking exchanges hide nothing


# -- async work through the deadline wrapper ------------------------------------------------------
def run_ranks(comms: list[GlooComm], fn: Callable[[GlooComm], object]) -> dict[int, object]:
    out: dict[int, object] = {}

    def target(c: GlooComm) -> None:
        try:
            out[c.rank] = fn(c)
        except GroupError as exc:
            out[c.rank] = exc

    threads = [threading.Thread(target=target, args=(c,)) for c in comms]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    return out


@pytest.mark.gloo
def test_exchanges_in_flight_are_waited_through_the_deadline_group() -> None:
    comms = form(relay_stores(2), floor_s=5.0)

    def rank(c: GlooComm) -> tuple[float, float, int, int]:
        other = 1 - c.rank
        first = c.start_exchange(torch.full((3,), float(c.rank)), [other], [other], [(3,)])
        second = c.start_exchange(torch.full((2,), 10.0 + c.rank), [other], [other], [(2,)])
        torch.randn(200, 200) @ torch.randn(200, 200)  # compute while both are in flight
        a, b = c.finish_exchange(first)[0], c.finish_exchange(second)[0]
        return float(a[0]), float(b[1]), c.trace.rounds, c.trace.exchange_bytes_recv

    out = run_ranks(comms, rank)
    assert out == {0: (1.0, 11.0, 2, 5 * 4), 1: (0.0, 10.0, 2, 5 * 4)}


@pytest.mark.gloo
def test_a_peer_that_never_sends_fails_the_wait_at_the_deadline() -> None:
    comms = form(relay_stores(2), floor_s=0.5)
    release = threading.Event()

    def rank(c: GlooComm) -> object:
        if c.rank == 1:
            release.wait(timeout=20)  # frozen: never launches its side
            return None
        pending = c.start_exchange(torch.ones(3), [1], [1], [(3,)])
        try:
            return c.finish_exchange(pending)
        finally:
            release.set()

    out = run_ranks(comms, rank)
    assert isinstance(out[0], GroupError)
    assert "exchange failed on rank 0" in str(out[0])
    assert out[0].reason is FailureReason.COLLECTIVE_TIMEOUT  # told from GLOO's own error
