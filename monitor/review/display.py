"""What reviewers are shown of untrusted episode data: invisible characters made visible,
metadata bounded in depth and size.

* **Invisible and direction-changing characters** (bidi overrides and isolates, zero-width
  characters, tag characters, fillers...) let a model show a reviewer text that differs from
  what it emitted: ``"safe\\u202eevil"`` displays reversed, a zero-width space splits a word a
  filter looks for. The review page replaces each one with a visible marker (``⟨U+202E⟩``);
  the claim API counts them per field. Stored text is never changed.
* **Metadata** is free-form JSON from the producer: nested hundreds of levels deep it breaks
  JSON serializers (Pydantic refuses past its depth limit) and huge values make the page
  useless. :func:`bounded` cuts depth, container sizes and string lengths, with a visible
  marker wherever something was cut.
"""

from __future__ import annotations

import math
import re
import unicodedata
from typing import Any

from markupsafe import Markup, escape

# Format characters (Unicode category Cf; a test checks the list against unicodedata) and
# other characters that render as nothing: combining grapheme joiner, Hangul and Khmer
# fillers, Mongolian variation selectors, the variation selectors supplement (which can
# smuggle data after a visible character). FE00-FE0F stay: emoji need them.
_INVISIBLE_RANGES = (
    (0x00AD, 0x00AD),
    (0x034F, 0x034F),
    (0x0600, 0x0605),
    (0x061C, 0x061C),
    (0x06DD, 0x06DD),
    (0x070F, 0x070F),
    (0x0890, 0x0891),
    (0x08E2, 0x08E2),
    (0x115F, 0x1160),
    (0x17B4, 0x17B5),
    (0x180B, 0x180F),
    (0x200B, 0x200F),
    (0x202A, 0x202E),
    (0x2060, 0x2064),
    (0x2066, 0x206F),
    (0x3164, 0x3164),
    (0xFEFF, 0xFEFF),
    (0xFFA0, 0xFFA0),
    (0xFFF9, 0xFFFB),
    (0x110BD, 0x110BD),
    (0x110CD, 0x110CD),
    (0x13430, 0x1343F),
    (0x1BCA0, 0x1BCA3),
    (0x1D173, 0x1D17A),
    (0xE0001, 0xE0001),
    (0xE0020, 0xE007F),
    (0xE0100, 0xE01EF),
)
INVISIBLE = re.compile(
    "[" + "".join(f"\\U{lo:08x}" if lo == hi else f"\\U{lo:08x}-\\U{hi:08x}" for lo, hi in _INVISIBLE_RANGES) + "]"
)

MAX_DEPTH = 6
MAX_ITEMS = 50
MAX_STRING = 2000
MAX_KEY = 200


def invisible_count(text: str | None) -> int:
    """How many invisible or direction-changing characters ``text`` holds."""
    return len(INVISIBLE.findall(text)) if text else 0


def marker(ch: str) -> str:
    return f"⟨U+{ord(ch):04X}⟩"


def reveal(text: Any) -> Markup:
    """``text`` escaped for HTML, every invisible character replaced by a visible marker span.

    >>> str(reveal("a\\u202eb<"))
    'a<span class="invisible-char" title="U+202E RIGHT-TO-LEFT OVERRIDE">⟨U+202E⟩</span>b&lt;'
    """
    s = "" if text is None else str(text)
    out: list[str] = []
    pos = 0
    for m in INVISIBLE.finditer(s):
        ch = m.group()
        name = unicodedata.name(ch, "invisible character")
        out.append(str(escape(s[pos : m.start()])))
        out.append(
            f'<span class="invisible-char" title="{escape(f"U+{ord(ch):04X} {name}")}">{escape(marker(ch))}</span>'
        )
        pos = m.end()
    out.append(str(escape(s[pos:])))
    return Markup("".join(out))  # noqa: S704 - every piece above is escaped


def bounded(value: Any, depth: int = 0) -> Any:
    """A JSON-safe copy of ``value`` cut to :data:`MAX_DEPTH` levels, :data:`MAX_ITEMS` entries
    per container and :data:`MAX_STRING` characters per string, with markers where cut.

    >>> bounded({"a": [[[[[[["deep"]]]]]]]})
    {'a': [[[[['…(nested deeper than 6 levels)']]]]]}
    """
    if value is None or isinstance(value, bool | int):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else str(value)
    if isinstance(value, str):
        if len(value) <= MAX_STRING:
            return value
        return value[:MAX_STRING] + f"…({len(value) - MAX_STRING} more characters)"
    if not isinstance(value, dict | list | tuple):
        return bounded(str(value), depth)
    if depth >= MAX_DEPTH:
        return f"…(nested deeper than {MAX_DEPTH} levels)"
    if isinstance(value, dict):
        out: dict[str, Any] = {}
        for i, (k, v) in enumerate(value.items()):
            if i == MAX_ITEMS:
                out["…"] = f"{len(value) - MAX_ITEMS} more keys"
                break
            out[str(k)[:MAX_KEY]] = bounded(v, depth + 1)
        return out
    items = [bounded(v, depth + 1) for v in value[:MAX_ITEMS]]
    if len(value) > MAX_ITEMS:
        items.append(f"…({len(value) - MAX_ITEMS} more items)")
    return items
