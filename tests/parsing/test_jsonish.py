"""Bracket-group children (`parsing/jsonish.py`): strict JSON is read by the json module,
everything else by the character walk, with the same spans either way."""

from __future__ import annotations

import json

import pytest

from vieval_runner.parsing.jsonish import children


def _texts(spans, s):
    return [s[a:b] for a, b in spans]


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ('[{"bbox_2d": [1, 2, 3, 4], "label": "a, b"}, [5, 6]]',
         ['{"bbox_2d": [1, 2, 3, 4], "label": "a, b"}', "[5, 6]"]),
        ('{"a": "x:y", "b" : [1,\n 2] }', ['"x:y"', "[1,\n 2]"]),
        ("[ ]", []),
        ('["\\"],", 7]', ['"\\"],"', "7"]),
        # not strict JSON: single quotes, a trailing comma, Python's None (the walk's work)
        ("[{'bbox_2d': [1, 2, 3, 4]}, (5, 6)]", ["{'bbox_2d': [1, 2, 3, 4]}", "(5, 6)"]),
        ("[1, 2, ]", ["1", "2"]),
        ("{'a': None, 'b': 'c,d'}", ["None", "'c,d'"]),
    ],
)  # fmt: skip
def test_children_spans(text, expected):
    assert _texts(children(text, (0, len(text))), text) == expected


def test_children_of_strict_json_are_its_values():
    # reference: the json module's own parse of each child span
    value = [{"bbox_2d": [10, 20, 30, 40], "label": 'say "hi", ok'}, [], {}, "x", 1.5e3, None]
    text = json.dumps(value, indent=1)
    spans = children(text, (0, len(text)))
    assert [json.loads(text[a:b]) for a, b in spans] == value
    inner = spans[0]
    assert [json.loads(text[a:b]) for a, b in children(text, inner)] == list(value[0].values())


def test_group_cut_short_keeps_the_whole_children():
    text = '[{"bbox_2d": [1, 2, 3, 4]}, {"bbox_2d": [5, 6'
    assert _texts(children(text, (0, len(text))), text) == [
        '{"bbox_2d": [1, 2, 3, 4]}',
        '{"bbox_2d": [5, 6',
    ]
