"""The values a signal keeps while its detectors are being built, checkpointed at every batch.

Why a class of its own: the list grows for as long as a build runs (a calibration simulation
takes seconds to a minute), at the stream's full rate, and every batch checkpoints it. Written
out as JSON lists of ``[value, [episode id, event time, index]]`` it cost every batch a Python
loop and a JSON encoding over the whole list: quadratic in the build's length, and half of the
ingest thread's time in ``bench/kafka_ingest.py``. Here each value is packed once, when the first
checkpoint after its arrival asks for it, into columns (float64 values and event times, int64
indices: exact; vectors as float16, as vector references are). The columns are cut into chunks
of ``CHUNK`` scalars or ``VECTOR_CHUNK`` vectors: a full chunk is written once, as a state
component of its own (:func:`chunk_component`), and leaves memory; the signal's checkpoint holds only the open tail
and the number of chunks before it. So a batch writes at most one chunk's worth per waiting
signal, and a waiting signal holds at most about two chunks in memory, however long the build
takes at whatever rate; the chunks are read back, in order, when the detectors are installed.
Chunks left over from an earlier build of the same signal are overwritten by the next one's and
never read: the checkpoint says how many chunks are its own.

Checkpoints written before this module (``{"values": [...], "at": [[id, ts, index], ...]}``)
are still read.

>>> w = WaitingValues()
>>> w.append(0.5, ("ep-1", 100.0, 7))
>>> w.append(True, ("ep-2", 101.5, 8))
>>> state = w.to_state()
>>> sorted(state), w.new_chunks()
(['chunk', 'f64', 'ids', 'idx', 'n', 'sealed', 'ts'], [])
>>> list(WaitingValues.from_state(state))
[(0.5, ('ep-1', 100.0, 7)), (1.0, ('ep-2', 101.5, 8))]
"""

from __future__ import annotations

import base64
from array import array
from collections.abc import Callable, Iterator, Mapping
from typing import Any

#: Where a value arrived: (episode id, event time, input index).
At = tuple[str, float, int]
#: Values per chunk written once (see the module docstring): scalars, and vectors, whose rows are
#: far larger (a 384-dimension embedding is 1 KB of base64 as float16). The open tail is what every
#: batch rewrites: with 1,024 values a chunk, as both were cut before, it reached 1 MB a stream for
#: the embedding and 40 KB for a text signal (its episode ids, times and indices). A checkpoint
#: records its chunk size (``chunk``); one without it was cut at :data:`EARLIER_CHUNK`.
CHUNK = 256
VECTOR_CHUNK = 32
EARLIER_CHUNK = 1024


def chunk_component(component: str, signal: str, j: int) -> str:
    """The state component that holds chunk ``j`` of ``signal``'s waiting values."""
    return f"{component}:wait:{signal}:{j}"


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _column(text: str, code: str) -> array[Any]:
    out = array(code)
    out.frombytes(base64.b64decode(text))
    return out


class WaitingValues:
    """A signal's values in arrival order, each with where it arrived; see the module docstring.

    Values in chunks already handed to a checkpoint are dropped from memory (they are in the
    store from that checkpoint's commit on); :meth:`items` reads them back when the detectors are
    installed. Memory per waiting signal is thus at most about two chunks, whatever the rate."""

    def __init__(self, chunk: int | None = None) -> None:
        """``chunk``: values per chunk; by default by the first value's kind (:attr:`chunk`)."""
        self._base = 0  # values before the in-memory ones: in stored chunks
        self._chunk = chunk  # None: set by the first value
        self._items: list[tuple[Any, At]] = []  # the values from _base on
        self._packed = 0  # in-memory values already in the columns below
        self._vector: bool | None = None  # None until the first value: scalars or vectors
        self._scalars = array("d")
        self._vectors = bytearray()  # float16, row after row
        self._dim = 0
        self._ts = array("d")
        self._idx = array("q")
        self._ids: list[str] = []

    def append(self, x: Any, at: At) -> None:
        self._items.append((x, at))

    def __len__(self) -> int:
        return self._base + len(self._items)

    @property
    def chunk(self) -> int:
        """Values per chunk: :data:`VECTOR_CHUNK` for vectors, :data:`CHUNK` for scalars (or what
        the checkpoint it was read from says)."""
        return CHUNK if self._chunk is None else self._chunk

    def items(self, load_chunk: Callable[[int], Mapping[str, Any] | None]) -> Iterator[tuple[Any, At]]:
        """Every value in order: the stored chunks through ``load_chunk(j)`` (a chunk that is
        missing raises ``ValueError``), then those in memory."""
        size = self.chunk
        for j in range(self._base // size):
            chunk = load_chunk(j)
            if chunk is None:
                raise ValueError(f"chunk {j} of the waiting values is missing")
            part = WaitingValues.from_state(chunk)
            if len(part) != size:
                raise ValueError(f"chunk {j} of the waiting values has {len(part)} values")
            yield from part._items
        yield from self._items

    def runs(
        self, load_chunk: Callable[[int], Mapping[str, Any] | None], size: int
    ) -> Iterator[tuple[list[Any], list[At]]]:
        """:meth:`items` in consecutive runs of at most ``size``: values and where each arrived.

        >>> w = WaitingValues()
        >>> for i in range(5):
        ...     w.append(float(i), (f"ep-{i}", 100.0 + i, i))
        >>> [xs for xs, _ in w.runs(lambda j: None, 2)]
        [[0.0, 1.0], [2.0, 3.0], [4.0]]
        """
        xs: list[Any] = []
        ats: list[At] = []
        for x, at in self.items(load_chunk):
            xs.append(x)
            ats.append(at)
            if len(xs) >= size:
                yield xs, ats
                xs, ats = [], []
        if xs:
            yield xs, ats

    def __iter__(self) -> Iterator[tuple[Any, At]]:
        if self._base:
            raise RuntimeError("some waiting values are in stored chunks: read them with items()")
        return iter(self._items)

    def _pack_new(self) -> None:
        new = self._items[self._packed :]
        if not new:
            return
        if self._vector is None:
            self._vector = hasattr(new[0][0], "shape")
        if self._chunk is None:
            self._chunk = VECTOR_CHUNK if self._vector else CHUNK
        if self._vector:
            import numpy as np

            block = np.asarray([x for x, _ in new], dtype=np.float16)
            self._dim = int(block.shape[1]) if block.ndim == 2 else 0
            self._vectors += block.tobytes()
        else:
            self._scalars.extend(float(x) for x, _ in new)
        self._ids.extend(at[0] for _, at in new)
        self._ts.extend(float(at[1]) for _, at in new)
        self._idx.extend(int(at[2]) for _, at in new)
        self._packed = len(self._items)

    def _drop_to(self, n: int) -> None:
        """Forget the values before position ``n`` (stored in chunks now)."""
        k = n - self._base
        if k <= 0:
            return
        del self._items[:k], self._scalars[:k], self._ts[:k], self._idx[:k], self._ids[:k]
        del self._vectors[: k * 2 * self._dim]
        self._packed -= k
        self._base = n

    def same_arrivals(self, other: WaitingValues) -> bool:
        """Whether both hold values of the same episodes in the same order: the text signals of a
        stream, filled and built together, do; a checkpoint then writes the arrivals once."""
        if len(self) != len(other) or self._base != other._base:
            return False
        self._pack_new()
        other._pack_new()
        return self._idx == other._idx and self._ts == other._ts and self._ids == other._ids

    def _columns(self, lo: int, hi: int, arrivals: bool) -> dict[str, Any]:
        """Positions ``lo`` to ``hi`` (in memory) as columns."""
        a, b = lo - self._base, hi - self._base
        out: dict[str, Any] = {"n": hi - lo}
        if arrivals:
            # Episode ids hold no control characters (validated at ingest), so one line each is
            # one string to encode, not a list of them; an id that holds a newline keeps the list.
            part = self._ids[a:b]
            ids: str | list[str] = "\n".join(part)
            if ids.count("\n") != max(0, len(part) - 1):
                ids = part
            out.update(ids=ids, ts=_b64(self._ts[a:b].tobytes()), idx=_b64(self._idx[a:b].tobytes()))
        if self._vector:
            row = 2 * self._dim  # float16
            out["f16"] = _b64(bytes(self._vectors[a * row : b * row]))
            out["shape"] = [hi - lo, self._dim]
        else:
            out["f64"] = _b64(self._scalars[a:b].tobytes())
        return out

    def to_state(self, *, arrivals: bool = True) -> dict[str, Any]:
        """The checkpoint form: the open tail after the full chunks, and how many chunks there are.
        ``arrivals=False``: the values only (another signal's state holds the same arrivals)."""
        self._pack_new()
        size = self.chunk
        sealed = len(self) // size
        out = self._columns(sealed * size, len(self), arrivals)
        out["sealed"] = sealed
        out["chunk"] = size
        return out

    def new_chunks(self) -> list[tuple[int, dict[str, Any]]]:
        """The chunks filled since the last call, with their arrivals, to be written with the same
        checkpoint as :meth:`to_state`; their values leave memory. A checkpoint that does not
        commit is followed by a reload from the stored one (the pipeline's rule), which brings
        this count and the values back in line with the store."""
        self._pack_new()
        size = self.chunk
        sealed = len(self) // size
        # The chunks before _base were handed out already (or read back from the checkpoint).
        out = [(j, self._columns(j * size, (j + 1) * size, True)) for j in range(self._base // size, sealed)]
        self._drop_to(sealed * size)
        return out

    @staticmethod
    def arrivals(w: Mapping[str, Any]) -> list[At]:
        """Where the values of a state's tail (or of a chunk) arrived."""
        ts, idx = _column(w["ts"], "d"), _column(w["idx"], "q")
        raw = w["ids"]
        ids = [str(i) for i in raw] if isinstance(raw, list) else (str(raw).split("\n") if len(ts) else [])
        if not len(ids) == len(ts) == len(idx):
            raise ValueError("waiting values: columns of different lengths")
        return list(zip(ids, ts, idx, strict=True))

    @staticmethod
    def _values(w: Mapping[str, Any]) -> list[Any]:
        if "f16" in w:
            return unpack_ref(w) or []
        return _column(w["f64"], "d").tolist()

    @classmethod
    def _tail_arrivals(cls, w: Mapping[str, Any], arrivals_of: Mapping[str, Any] | None, n: int) -> list[At]:
        if "ids" in w:
            ats = cls.arrivals(w)
        elif arrivals_of is not None:
            ats = cls.arrivals(arrivals_of)
        elif n:
            raise ValueError("waiting values without their arrivals")
        else:
            ats = []
        if len(ats) != n:
            raise ValueError("waiting values: values and arrivals of different lengths")
        return ats

    @classmethod
    def from_state(cls, w: Mapping[str, Any], arrivals_of: Mapping[str, Any] | None = None) -> WaitingValues:
        """Read :meth:`to_state`'s form: its ``sealed`` chunks stay in the store (:meth:`items`
        reads them); ``arrivals_of`` is the state of the signal that holds the tail's arrivals,
        when this one's does not. Or read the older ``values``/``at`` lists."""
        out = cls()
        if "at" in w:  # the form before this module
            for x, a in zip(unpack_ref(w["values"]) or [], w["at"], strict=True):
                out.append(x, (str(a[0]), a[1], int(a[2])))
            return out
        size = int(w.get("chunk", EARLIER_CHUNK))
        if size <= 0:
            raise ValueError(f"waiting values in chunks of {size}")
        out = cls(size)
        out._base = int(w.get("sealed", 0)) * size
        values = cls._values(w)
        for x, at in zip(values, cls._tail_arrivals(w, arrivals_of, len(values)), strict=True):
            out.append(x, at)
        return out


def pack_ref(ref: list[Any] | None) -> Any:
    """Scalar references stay JSON lists; vector references are float16 base64 (a fifth of the size)."""
    if ref is None or not ref or not hasattr(ref[0], "shape"):
        return ref
    import numpy as np

    arr = np.asarray(ref, dtype=np.float16)
    return {"f16": _b64(arr.tobytes()), "shape": list(arr.shape)}


def unpack_ref(ref: Any) -> list[Any] | None:
    """The inverse of :func:`pack_ref` (vectors come back as float32)."""
    if isinstance(ref, dict) and "f16" in ref:
        import numpy as np

        arr = np.frombuffer(base64.b64decode(ref["f16"]), dtype=np.float16).reshape(ref["shape"]).astype(np.float32)
        return list(arr)
    return None if ref is None else list(ref)
