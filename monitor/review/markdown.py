"""Markdown of model output, rendered for reviewers without letting any markup through.

Model text is untrusted: a renderer that passes raw HTML, or a link with any scheme, turns an
episode into an attack on the reviewer. So this is not a general Markdown implementation but a
small renderer that **escapes everything first** (every piece of text goes through
:func:`monitor.review.display.reveal`, which also shows invisible characters as markers) and
then emits a fixed, small set of tags of its own:

* paragraphs (``<p>``, line breaks kept), ATX headings as a bold paragraph;
* ``**strong**`` / ``__strong__``, ``*em*`` / ``_em_`` (not inside words: ``snake_case`` stays);
* ```code spans``` and fenced code blocks (:func:`split_fences`, shown as ``<pre><code>``);
* bullet and numbered lists (one level; indented lines continue the item);
* links ``[text](url)`` only with an ``http`` or ``https`` URL, as ``<a rel="noopener noreferrer
  nofollow">`` followed by the URL as visible text (a link text cannot hide where it goes); any
  other link, and every image (``![alt](url)``: never loaded), is shown as the literal text.

Raw HTML is never interpreted: ``<script>`` is shown as the text ``<script>``. Every pattern is
bounded (body lengths, nesting depth) so that hostile input costs time linear in its length,
and text over :data:`MAX_MARKDOWN` characters is shown as plain text.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from urllib.parse import urlsplit

from markupsafe import Markup, escape

from monitor.review.display import INVISIBLE, reveal

# Longer text is shown verbatim (escaped, markers), not parsed: an episode is at most
# max_episode_bytes, but no reviewer reads a 100 KB message as formatted prose anyway.
MAX_MARKDOWN = 64_000
MAX_INLINE_DEPTH = 3  # emphasis inside a link inside emphasis...; deeper is shown as text
MAX_URL = 2000
SCHEMES = ("http", "https")


# -- fenced code blocks ----------------------------------------------------------------------


@dataclass(frozen=True)
class Segment:
    """Prose or a fenced code block. ``info``: the opening fence's whole info string (stripped),
    shown to the reviewer as the block's caption; ``lang``: its first word when that is a plain
    language name, else empty (a checked word, safe as an attribute)."""

    code: bool
    text: str
    lang: str = ""
    info: str = ""


_OPEN_FENCE = re.compile(r"^[ \t]{0,3}(`{3,})([^`\r\n]*)\r?\n?$")
_LANG = re.compile(r"[A-Za-z0-9_+#.-]{1,32}")


def split_fences(text: str) -> list[Segment]:
    """Split model text into prose and fenced code blocks (CommonMark-style backtick fences).

    Only the structure is parsed: the text of every segment is returned verbatim for the
    caller to escape. An unclosed fence runs to the end of the text. The opening fence's info
    string is kept whole (``info``): a model can write a sentence after the backticks, and a
    reviewer must see every character the model emitted, not only the language word.

    >>> [(s.code, s.text, s.lang) for s in split_fences("hi\\n```py\\nx = 1\\n```\\nbye")]
    [(False, 'hi', ''), (True, 'x = 1', 'py'), (False, 'bye', '')]
    >>> split_fences("```py  run me first\\nx\\n```")[0].info
    'py  run me first'
    """
    segments: list[Segment] = []
    buf: list[str] = []
    fence: str | None = None
    lang = info = ""

    def flush(code: bool) -> None:
        chunk = "".join(buf)
        buf.clear()
        if code:
            segments.append(Segment(True, chunk.removesuffix("\n").removesuffix("\r"), lang, info))
        elif chunk.strip():
            segments.append(Segment(False, chunk.removesuffix("\n").removesuffix("\r")))

    for line in text.splitlines(keepends=True):
        if fence is None:
            m = _OPEN_FENCE.match(line)
            if m:
                flush(False)
                fence = m.group(1)
                info = m.group(2).strip()
                words = info.split(maxsplit=1)
                lang = words[0] if words and _LANG.fullmatch(words[0]) else ""
                continue
            buf.append(line)
        else:
            stripped = line.strip()
            if stripped.startswith(fence) and not stripped.strip("`") and len(line) - len(line.lstrip(" ")) <= 3:
                flush(True)
                fence = None
                lang = info = ""
                continue
            buf.append(line)
    flush(fence is not None)
    if not segments:
        segments.append(Segment(False, text))
    return segments


def code_block(seg: Segment) -> str:
    """A fenced code block as ``<pre class="code"><code>``, its info string shown (escaped, with
    markers) as a caption line, and the language (a checked word) as data."""
    lang = f' data-lang="{escape(seg.lang)}"' if seg.lang else ""
    caption = f'<span class="fence-info">{reveal(seg.info)}</span>' if seg.info else ""
    return f'<pre class="code"{lang}>{caption}<code>{reveal(seg.text)}</code></pre>'


# -- inline ------------------------------------------------------------------------------------

# One alternation, tried left to right at each position; every body is bounded and stays on
# one line, so a pathological line costs at most (length x bound) steps.
_INLINE = re.compile(
    r"(?P<tick>`{1,3})(?P<code>[^`\n](?:[^\n]{0,1998}?[^`\n])?)(?P=tick)(?!`)"
    r"|(?P<img>!?)\[(?P<text>[^\[\]\n]{1,500})\]\((?P<url>[^\s()<>]{1,2000})\)"
    r"|(?P<star2>\*\*)(?P<sbody>[^\s*](?:[^\n]{0,498}?[^\s*])?)\*\*"
    r"|(?<![A-Za-z0-9_])__(?P<ubody>[^\s_](?:[^\n]{0,498}?[^\s_])?)__(?![A-Za-z0-9_])"
    r"|(?<!\*)\*(?P<ebody>[^\s*](?:[^\n]{0,498}?[^\s*])?)\*(?!\*)"
    r"|(?<![A-Za-z0-9_])_(?P<eubody>[^\s_](?:[^\n]{0,498}?[^\s_])?)_(?![A-Za-z0-9_])"
)


def safe_url(url: str) -> str | None:
    """``url`` if it is an absolute http(s) URL with a host and nothing invisible or control
    in it; None otherwise (shown as text, never as a link).

    >>> safe_url("https://example.org/a?b=1"), safe_url("javascript:alert(1)"), safe_url("//x.org")
    ('https://example.org/a?b=1', None, None)
    """
    if len(url) > MAX_URL or INVISIBLE.search(url) or any(ord(c) < 0x20 or 0x7F <= ord(c) <= 0x9F for c in url):
        return None
    try:
        parts = urlsplit(url)
    except ValueError:
        return None
    if parts.scheme.lower() not in SCHEMES or not parts.netloc or "\\" in url:
        return None
    return url


def _link(m: re.Match[str], depth: int) -> str:
    text, url = m.group("text"), m.group("url")
    if m.group("img"):
        # An image is never loaded (it would call out, and CSP blocks it anyway): its alt text and URL as text.
        return str(reveal(f"[image: {text}] ({url})"))
    href = safe_url(url)
    if href is None:
        return str(reveal(m.group()))
    shown = f' <span class="md-url">({reveal(url)})</span>' if text.strip() != url else ""
    return (
        f'<a href="{escape(href)}" rel="noopener noreferrer nofollow" target="_blank">'
        f"{inline(text, depth + 1)}</a>{shown}"
    )


def _token(m: re.Match[str], depth: int) -> str:
    if m.group("tick"):
        return f"<code>{reveal(m.group('code'))}</code>"
    if m.group("url") is not None:
        return _link(m, depth)
    strong = m.group("sbody") or m.group("ubody")
    if strong is not None:
        return f"<strong>{inline(strong, depth + 1)}</strong>"
    return f"<em>{inline(m.group('ebody') or m.group('eubody'), depth + 1)}</em>"


def inline(text: str, depth: int = 0) -> str:
    """Inline markdown of one block: escaped text with code spans, emphasis and safe links.

    >>> inline("**bold** `<b>` [x](javascript:alert(1)) <img src=x>")
    '<strong>bold</strong> <code>&lt;b&gt;</code> [x](javascript:alert(1)) &lt;img src=x&gt;'
    """
    if depth >= MAX_INLINE_DEPTH:
        return str(reveal(text))
    out: list[str] = []
    pos = 0
    for m in _INLINE.finditer(text):
        out.append(str(reveal(text[pos : m.start()])))
        out.append(_token(m, depth))
        pos = m.end()
    out.append(str(reveal(text[pos:])))
    return "".join(out)


# -- blocks ------------------------------------------------------------------------------------

_ITEM = re.compile(r"^[ \t]{0,3}(?:[-*+]|(?P<num>\d{1,9})[.)])[ \t]+(?P<body>\S.*)$")
_HEADING = re.compile(r"^[ \t]{0,3}#{1,6}[ \t]+(?P<body>.*?)[ \t#]*$")


class _Blocks:
    """Paragraphs and lists of one prose segment, emitted as they close."""

    def __init__(self) -> None:
        self.html: list[str] = []
        self.para: list[str] = []
        self.items: list[str] = []
        self.ordered = False
        self.start = 1

    def close_para(self) -> None:
        if self.para:
            self.html.append(f"<p>{inline(chr(10).join(self.para))}</p>")
            self.para = []

    def close_list(self) -> None:
        if self.items:
            lis = "".join(f"<li>{inline(i)}</li>" for i in self.items)
            start = f' start="{self.start}"' if self.ordered and self.start != 1 else ""
            tag = "ol" if self.ordered else "ul"
            self.html.append(f"<{tag}{start}>{lis}</{tag}>")
            self.items = []

    def item(self, m: re.Match[str]) -> None:
        ordered = m.group("num") is not None
        self.close_para()
        if self.items and ordered != self.ordered:
            self.close_list()
        if not self.items:
            self.ordered = ordered
            self.start = int(m.group("num")) if ordered else 1
        self.items.append(m.group("body"))

    def line(self, line: str) -> None:
        if not line.strip():
            self.close_para()
            self.close_list()
            return
        m = _ITEM.match(line)
        if m:
            self.item(m)
            return
        h = _HEADING.match(line)
        if h:
            self.close_para()
            self.close_list()
            self.html.append(f'<p class="md-heading"><strong>{inline(h.group("body"))}</strong></p>')
            return
        if self.items and line[:1] in (" ", "\t"):
            self.items[-1] += "\n" + line.strip()  # a continuation of the list item
            return
        self.close_list()
        self.para.append(line)


def blocks(text: str) -> str:
    """Paragraphs, headings and lists of a prose segment (no code fences in it)."""
    b = _Blocks()
    # Only real line ends: splitlines() would also break at U+2028, form feeds and the like and
    # drop them, and the reviewer must see every character the model emitted.
    for line in text.replace("\r\n", "\n").split("\n"):
        b.line(line)
    b.close_para()
    b.close_list()
    return "".join(b.html)


def render_markdown(text: str | None) -> Markup:
    """Model text as safe HTML inside ``<div class="md">`` (see the module docstring).

    >>> str(render_markdown("Hi <script>alert(1)</script>\\n\\n- a\\n- *b*"))
    '<div class="md"><p>Hi &lt;script&gt;alert(1)&lt;/script&gt;</p><ul><li>a</li><li><em>b</em></li></ul></div>'
    """
    text = text or ""
    if len(text) > MAX_MARKDOWN:
        return Markup(f'<div class="md plain prose">{reveal(text)}</div>')  # noqa: S704 - reveal escapes
    html = "".join(code_block(s) if s.code else blocks(s.text) for s in split_fences(text))
    return Markup(f'<div class="md">{html}</div>')  # noqa: S704 - every piece is escaped or a fixed tag
