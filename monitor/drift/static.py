"""The part of a signal's drift state that a build fixes: written once per build, not per batch.

Why: a stream's checkpoint is written in every batch's transaction. A built signal's detectors
carry their reference (a CUSUM on a binary signal keeps 4,000 values, a kernel MMD 200 x 384
floats) and the signal its normal-score transform (the sorted reference), none of which change
until the next build. Written whole at every batch they were 189 KB of JSON per stream for the
eight default text signals (and about 1 MB more with the embedding detector), encoded and
written again at each of the stream's batches. Now each signal keeps:

* in the stream's checkpoint, what changes: the detectors' online state (signed pickles without
  their :attr:`detectors.base.Detector.static_attrs`), a few hundred bytes each;
* in a state component of its own (``drift:static:<signal>``), the transform and those
  attributes, written in the transaction of the first checkpoint after the build. One component
  per signal is overwritten by the next build, so the store holds one per stream and signal.

Integrity: the checkpoint holds the SHA-256 of the component's content (signed with the
detectors), and a load checks it, so a checkpoint never pairs with another build's reference. Arrays
are stored in the ``.npy`` format and read with ``allow_pickle=False``: nothing from this component
is unpickled. A component that is missing or does not match makes its signal warm up again.

>>> import numpy as np
>>> content, sha = pack_static({"scale": 1.0}, {"cusum": {"x_ref": np.arange(3.0)}})
>>> transform, static = unpack_static(content, sha)
>>> transform, static["cusum"]["x_ref"].tolist()
({'scale': 1.0}, [0.0, 1.0, 2.0])
>>> unpack_static(content, "0" * 64)
Traceback (most recent call last):
...
ValueError: static drift state does not match its checkpoint
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
from collections.abc import Mapping
from typing import Any


def static_component(component: str, signal: str) -> str:
    """The state component holding ``signal``'s static part."""
    return f"{component}:static:{signal}"


def pack_static(
    transform: Mapping[str, Any] | None, static: Mapping[str, Mapping[str, Any]]
) -> tuple[dict[str, Any], str]:
    """The component's content (JSON) and its SHA-256, from the transform and, per detector name,
    the static attributes that :meth:`detectors.base.Detector.snapshot_parts` handed out."""
    content = {
        "transform": None if transform is None else dict(transform),
        "detectors": {name: {a: _npy(v) for a, v in attrs.items()} for name, attrs in static.items()},
    }
    return content, _digest(content)


def unpack_static(content: Any, sha: str) -> tuple[dict[str, Any] | None, dict[str, dict[str, Any]]]:
    """The transform and the static attributes per detector; ValueError when ``content`` is not
    what the checkpoint's ``sha`` says (missing, or another build's)."""
    if not isinstance(content, dict) or _digest(content) != sha:
        raise ValueError("static drift state does not match its checkpoint")
    import numpy as np

    static = {
        name: {a: np.load(io.BytesIO(base64.b64decode(v)), allow_pickle=False) for a, v in attrs.items()}
        for name, attrs in content["detectors"].items()
    }
    return content["transform"], static


def _npy(value: Any) -> str:
    import numpy as np

    buf = io.BytesIO()
    np.save(buf, np.asarray(value), allow_pickle=False)  # a value that needs pickling raises here
    return base64.b64encode(buf.getvalue()).decode("ascii")


def _digest(content: Mapping[str, Any]) -> str:
    return hashlib.sha256(json.dumps(content, sort_keys=True, separators=(",", ":")).encode()).hexdigest()
