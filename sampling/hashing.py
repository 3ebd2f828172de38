"""Keyed uniform numbers per episode.

A policy that could predict which of its episodes are reviewed could behave
differently on the others, so the uniform is a keyed hash (BLAKE2b with a
secret key), not a plain hash of the id.
"""

from __future__ import annotations

import hashlib

_SCALE = float(2**64)


def keyed_uniform(key: bytes, episode_id: str, salt: str) -> float:
    """Uniform number in [0, 1) that depends only on (key, salt, episode_id).

    ``salt`` separates independent draws for the same episode (the review
    channels share one draw so they nest; the drift channel uses another).
    """
    h = hashlib.blake2b(episode_id.encode("utf-8", "surrogatepass"), digest_size=8, key=key, salt=salt.encode()[:16])
    return int.from_bytes(h.digest(), "big") / _SCALE
