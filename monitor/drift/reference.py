"""A filling reference in the checkpoint: its full chunks written once, only the tail per batch.

Why: a signal's reference fills over its warm-up (``drift.reference_size`` values: 500 of each
text signal, 200 drift embeddings), and every batch checkpoints the stream. Written whole, the
reference was rewritten at each batch for as long as it filled, and for as long as its detectors
were built after it: quadratic in the warm-up. For the embedding signal that is up to 205 KB of
base64 per stream and batch (200 x 384 float16), filling at the drift sampling rate (5% of the
stream), so for minutes to hours. In a steady run of the service path over the bundled traffic,
embedding references filling, the stream states were 200-425 KB each, encoded and written by every
batch. On PostgreSQL each such row is also a new TOASTed version in the WAL.

Here the reference is cut into chunks of :func:`chunk_size` values (32 vectors, 128 scalars):
a full chunk is written once, as a state component of its own (:func:`ref_component`), in the
transaction of the first checkpoint that finds it full; the stream's checkpoint holds the open
tail and the number of chunks before it (``ref_sealed``). Unlike the values that wait for a
build (``monitor/drift/waiting.py``), the reference stays whole in memory (the build needs it,
and it is bounded by ``reference_size``); only what is written changes. A load reads the chunks
back in order; one that is missing or not full raises ``ValueError`` (the caller warms that
signal up again). Chunks of an earlier reference of the same signal are overwritten by the next
one's and never read: the checkpoint says how many are its own. Checkpoints without
``ref_sealed`` hold the reference whole and are read as before.

>>> ref = [float(i) for i in range(300)]
>>> state, chunks = pack_reference(ref, sealed_before=0)
>>> state["ref_sealed"], len(state["ref"]), [j for j, _ in chunks]
(2, 44, [0, 1])
>>> stored = dict(chunks)
>>> unpack_reference(state, stored.get) == ref
True
>>> pack_reference(ref + [1.0], sealed_before=2)[1]  # the same chunks are not written again
[]
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

from monitor.drift.waiting import pack_ref, unpack_ref

#: Scalars per chunk: a JSON list of 128 floats, about 2.5 KB.
SCALAR_CHUNK = 128
#: Vectors per chunk: 32 float16 rows of a 384-dimension embedding, about 33 KB of base64.
VECTOR_CHUNK = 32


def ref_component(component: str, signal: str, j: int) -> str:
    """The state component that holds chunk ``j`` of ``signal``'s reference."""
    return f"{component}:ref:{signal}:{j}"


def chunk_size(ref: Sequence[Any]) -> int:
    """Values per chunk of ``ref``: by their kind (a vector has a ``shape``)."""
    return VECTOR_CHUNK if ref and hasattr(ref[0], "shape") else SCALAR_CHUNK


def pack_reference(ref: Sequence[Any], sealed_before: int) -> tuple[dict[str, Any], list[tuple[int, Any]]]:
    """The checkpoint's entries for ``ref`` (``ref``: the tail; ``ref_sealed`` and ``ref_chunk``:
    how many chunks of how many values come before it), and the chunks filled since
    ``sealed_before`` chunks were handed out, by number, to be written in the same transaction."""
    size = chunk_size(ref)
    sealed = len(ref) // size
    chunks = [(j, pack_ref(list(ref[j * size : (j + 1) * size]))) for j in range(sealed_before, sealed)]
    state = {"ref": pack_ref(list(ref[sealed * size :])), "ref_sealed": sealed, "ref_chunk": size}
    return state, chunks


def unpack_reference(state: Mapping[str, Any], load_chunk: Callable[[int], Any]) -> list[Any] | None:
    """The whole reference of a signal's checkpoint entry: its ``ref_sealed`` chunks through
    ``load_chunk(j)``, then the tail; ``ValueError`` when a chunk is missing or not full."""
    tail = unpack_ref(state.get("ref"))
    sealed = int(state.get("ref_sealed", 0))
    if not sealed:
        return tail
    size = int(state.get("ref_chunk", 0))
    if size <= 0:
        raise ValueError(f"reference chunks of {size} values")
    out: list[Any] = []
    for j in range(sealed):
        chunk = unpack_ref(load_chunk(j))
        if chunk is None:
            raise ValueError(f"chunk {j} of the reference is missing")
        if len(chunk) != size:
            raise ValueError(f"chunk {j} of the reference holds {len(chunk)} values, not {size}")
        out.extend(chunk)
    return out + (tail or [])
