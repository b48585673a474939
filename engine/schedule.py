"""The order in which a rank runs its layers and chunks: one order for both runners.

Without overlap a layer is send, exchange (blocking), finish. With overlap the batch runs
in chunks and every exchange is asynchronous: the sends of layer 0 go out for every
chunk first, then for each layer and chunk the rank computes the local rows' Q/K/V,
waits for that chunk's rows, finishes the layer and at once sends the chunk's next
layer. So while one chunk's rows are in flight the rank computes the other chunks (an
exchange launched after chunk c's layer i is waited for only after the other C - 1
chunks' layers, roughly (C - 1) / C of a layer's compute later):

    send(0, 0) send(0, 1) | fin(0, 0) send(1, 0) | fin(0, 1) send(1, 1) | fin(1, 0) ...

Per chunk the layers still run in order, which is all the ``codes`` method's per-layer
state needs (it keeps its state per sample). Every rank launches collectives in this same
order, which GLOO requires.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Step:
    """One step of a rank: ``send`` (attention input and its payload, then the exchange
    starts) or not (local Q/K/V, wait for the exchange, finish the layer) for ``layer`` and
    ``chunk``."""

    send: bool
    layer: int
    chunk: int


def steps(n_layers: int, chunks: int, overlap: bool) -> Iterator[Step]:
    """The steps of one job, in order (see the module)."""
    if not overlap:
        for i in range(n_layers):
            for c in range(chunks):
                yield Step(True, i, c)
                yield Step(False, i, c)
        return
    if n_layers == 0:
        return
    for c in range(chunks):
        yield Step(True, 0, c)
    for i in range(n_layers):
        for c in range(chunks):
            yield Step(False, i, c)
            if i + 1 < n_layers:
                yield Step(True, i + 1, c)
