"""Every JSON value in a model's output, with where it stood (the JSON box formats read them).

Models wrap JSON in prose and code fences, stop mid-list at ``max_new_tokens``, write trailing
commas or single quotes, or break a list with one stray brace. The reader takes every JSON
value it can find, repairs what is cheap, and from a cut-off or broken list salvages every
entry that is whole, before and after the fault.

Box spans (``Box.span``): the JSON object (``{"bbox_2d": [...], "label": ...}``) or bare
coordinate list a box was read from, found by walking the text's bracket structure alongside
the parsed value (where the two disagree, e.g. duplicate keys, a child takes its parent's span).
"""

from __future__ import annotations

import ast
import json
import re

_FENCE = re.compile(r"```[ \t]*(?:json|JSON)?[ \t]*\n?(.*?)(?:```|\Z)", re.S)
_OPEN = re.compile(r"[\[{]")
_MAX_DEPTH = 8  # salvage/recursion depth: junk like "[[[[[[" must stay linear in time
_FAIL = object()


Span = tuple[int, int]


def unfence(text: str, where: list[int]) -> tuple[str, list[int]]:
    """The fenced blocks joined by newlines (the text if none), with raw positions."""
    blocks = list(_FENCE.finditer(text))
    if not blocks:
        return text, where
    parts, kept = [], []
    for k, m in enumerate(blocks):
        if k:
            parts.append("\n")
            kept.append(kept[-1] if kept else where[m.start(1)] if where else 0)
        parts.append(m.group(1))
        kept.extend(where[m.start(1) : m.end(1)])
    return "".join(parts), kept


def _skip_string(s: str, i: int, quote: str = '"') -> int | None:
    """Index after the string starting at ``s[i] == quote``, or None if it never closes."""
    i += 1
    n = len(s)
    while i < n:
        c = s[i]
        if c == "\\":
            i += 2
        elif c == quote:
            return i + 1
        else:
            i += 1
    return None


_WS = re.compile(r"[ \t\n\r]*")
_DECODER = json.JSONDecoder()


def _json_children(s: str, span: Span) -> list[Span] | None:
    """`children` of a group that is strict JSON, read by the json module's scanner (C); None
    where it is not (the character walk below then decides)."""
    start, end = span
    is_dict = s[start] == "{"
    close = "}" if is_dict else "]"
    out: list[Span] = []
    i = _WS.match(s, start + 1).end()
    if i < end and s[i] == close:
        return out if i == end - 1 else None
    try:
        while True:
            if is_dict:
                if s[i] != '"':
                    return None
                _, i = _DECODER.raw_decode(s, i)
                i = _WS.match(s, i).end()
                if s[i] != ":":
                    return None
                i = _WS.match(s, i + 1).end()
            _, stop = _DECODER.raw_decode(s, i)
            out.append((i, stop))
            i = _WS.match(s, stop).end()
            if s[i] == ",":
                i = _WS.match(s, i + 1).end()
                continue
            return out if s[i] == close and i == end - 1 else None
    except (ValueError, IndexError, RecursionError):
        return None


def children(s: str, span: Span) -> list[Span]:
    """Spans of the elements (list) or values (dict) of the bracket group ``s[span]``, split
    at top-level commas; strings in double or single quotes are skipped whole."""
    if s[span[0] : span[0] + 1] in ("[", "{") and (fast := _json_children(s, span)) is not None:
        return fast
    start, end = span
    out: list[Span] = []
    item, value, depth, i = start + 1, None, 0, start + 1
    while i < end:
        c = s[i]
        if c in "\"'":
            j = _skip_string(s, i, c)
            i = end if j is None else j
            continue
        if c in "[{(":
            depth += 1
        elif c in "]})":
            depth -= 1
            if depth < 0:
                break
        elif depth == 0 and c == ":" and value is None:
            value = i + 1
        elif depth == 0 and c == ",":
            out.append(((value if s[start] == "{" and value is not None else item), i))
            item, value = i + 1, None
        i += 1
    out.append(((value if s[start] == "{" and value is not None else item), min(i, end)))
    spans = []
    for a, b in out:
        piece = s[a:b]
        a += len(piece) - len(piece.lstrip())
        b = a + len(piece.strip())
        if b > a:
            spans.append((a, b))
    return spans


def _balanced_end(s: str, start: int, limit: int) -> int | None:
    """Index after the bracket group opened at ``s[start]``, or None if it is still open."""
    depth = 0
    i = start
    while i < limit:
        c = s[i]
        if c == '"':
            j = _skip_string(s, i)
            if j is None:
                return None
            i = j
            continue
        if c in "[{":
            depth += 1
        elif c in "]}":
            depth -= 1
            if depth == 0:
                return i + 1
        i += 1
    return None


def _loads(span: str) -> object:
    """Strict JSON, then JSON without trailing commas, then a Python literal; else ``_FAIL``."""
    for attempt in (span, re.sub(r",\s*([\]}])", r"\1", span)):
        try:
            return json.loads(attempt)
        except (ValueError, RecursionError):
            pass
    try:
        return ast.literal_eval(span)  # single quotes, None/True: Qwen fine-tunes write them
    except (ValueError, TypeError, SyntaxError, MemoryError, RecursionError):
        return _FAIL


def _salvage(s: str, start: int, limit: int, flags: set[str], depth: int = 0) -> list:
    """Complete values inside the list opened at ``s[start]`` (not itself parseable).

    An object that cannot be read, or never closes (a stray ``{``, or the cut), is skipped up
    to the next ``{``: the objects after the fault are recovered, and a value cut in the
    middle yields no half-read box (its inner lists are never read on their own)."""
    out: list = []
    if s[start] != "[" or depth > _MAX_DEPTH:
        return out  # a dict cut in the middle has lost part of its entry: recover nothing
    i = start + 1
    while i < limit:
        c = s[i]
        if c == '"':
            j = _skip_string(s, i)
            if j is None:
                break
            i = j
            continue
        if c in "[{":
            end = _balanced_end(s, i, limit)
            val = _FAIL if end is None else _loads(s[i:end])
            if val is not _FAIL:
                out.append((val, (i, end)))
                i = end
            elif c == "[":
                out.extend(_salvage(s, i, limit if end is None else end - 1, flags, depth + 1))
                if end is None:
                    break
                i = end
            else:
                flags.add("malformed")
                nxt = s.find("{", i + 1, limit)
                if nxt < 0:
                    break
                i = nxt
            continue
        i += 1
    return out


def json_values(body: str) -> tuple[list[tuple[object, Span]], set[str]]:
    """Every top-level JSON value in ``body`` with its span (prose between them is skipped),
    and flags."""
    decoder = _DECODER
    values: list = []
    flags: set[str] = set()
    pos = 0
    while m := _OPEN.search(body, pos):
        start = m.start()
        try:
            val, pos = decoder.raw_decode(body, start)
            values.append((val, (start, pos)))
            continue
        except (ValueError, RecursionError):
            pass
        end = _balanced_end(body, start, len(body))
        if end is None:  # the output stops inside this value: keep what closed before the cut
            values.extend(_salvage(body, start, len(body), flags))
            flags.add("truncated")
            break
        val = _loads(body[start:end])
        if val is not _FAIL:
            values.append((val, (start, end)))
        else:
            if "{" in body[start:end]:
                flags.add("malformed")  # JSON objects that do not parse (prose "[a]" is not)
            values.extend(_salvage(body, start, end - 1, flags))
        pos = end
    return values, flags
