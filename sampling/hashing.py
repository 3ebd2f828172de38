"""Keyed uniform numbers per episode.

A policy that could predict which of its episodes are reviewed could behave
differently on the others, so the uniform is a keyed hash (BLAKE2b with a
secret key), not a plain hash of the id.
"""

from __future__ import annotations

import hashlib

_SCALE = float(2**64)


def keyed_uniforms(key: bytes, episode_id: str) -> tuple[float, float]:
    """Two independent uniforms in [0, 1) for an episode from one keyed digest.

    The first drives the nested review channels (human, rm), the second the
    drift channel. One 16-byte digest costs the same as one 8-byte digest.
    """
    d = hashlib.blake2b(episode_id.encode("utf-8", "surrogatepass"), digest_size=16, key=key).digest()
    return int.from_bytes(d[:8], "big") / _SCALE, int.from_bytes(d[8:], "big") / _SCALE


def keyed_uniform(key: bytes, episode_id: str, salt: str) -> float:
    """Uniform number in [0, 1) that depends only on (key, salt, episode_id).

    ``salt`` separates independent draws for the same episode (the review
    channels share one draw so they nest; the drift channel uses another).
    """
    h = hashlib.blake2b(episode_id.encode("utf-8", "surrogatepass"), digest_size=8, key=key, salt=salt.encode()[:16])
    return int.from_bytes(h.digest(), "big") / _SCALE
