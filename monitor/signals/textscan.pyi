from collections.abc import Sequence

def scan(
    texts: Sequence[str], lower: bytes, space: bytes, non_text: bytes, max_chars: int, /
) -> tuple[list[int], list[float], list[float], list[int]]: ...
