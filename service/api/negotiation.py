"""Content negotiation: pick the catalog format from an ``Accept`` header (RFC 9110 12.5.1)."""

from __future__ import annotations

from forcedphot.photometry.formats import ALIASES, DEFAULT_FORMAT, FORMATS


def _media_ranges(accept: str) -> list[tuple[str, float, int]]:
    """``(media range, q, position)`` for each element of the header; malformed q counts as 0."""
    ranges = []
    for position, element in enumerate(accept.split(",")):
        parts = [p.strip() for p in element.split(";")]
        media = parts[0].lower()
        if not media:
            continue
        q = 1.0
        for param in parts[1:]:
            name, _, value = param.partition("=")
            if name.strip().lower() == "q":
                try:
                    q = float(value)
                except ValueError:
                    q = 0.0
                q = q if 0.0 <= q <= 1.0 else 0.0
        ranges.append((media, q, position))
    return ranges


def _matches(media_range: str, media_type: str) -> int:
    """Specificity of a match (3 exact, 2 type/*, 1 */*) or 0 for none."""
    if media_range == media_type:
        return 3
    kind, _, sub = media_range.partition("/")
    if sub == "*" and media_type.startswith(kind + "/"):
        return 2
    return 1 if media_range == "*/*" else 0


def choose_format(accept: str | None) -> str | None:
    """The catalog format ("parquet", "csv", "json") for an ``Accept`` header, None if nothing fits.

    No header, or ``*/*``, gives parquet. Among acceptable formats the highest q wins; ties
    go to the most specific range, then to the earliest in the header, then parquet.
    """
    if not accept or not accept.strip():
        return DEFAULT_FORMAT
    ranges = _media_ranges(accept)
    ranges = [(FORMATS[ALIASES[m]] if m in ALIASES else m, q, p) for m, q, p in ranges]
    best: tuple | None = None
    for order, (fmt, media_type) in enumerate(FORMATS.items()):
        matches = [(_matches(m, media_type), q, -p) for m, q, p in ranges if _matches(m, media_type)]
        if not matches:
            continue
        specificity, q, position = max(matches)  # the most specific range decides q
        if q <= 0:
            continue
        score = (q, specificity, position, -order)
        if best is None or score > best[0]:
            best = (score, fmt)
    return best[1] if best else None
