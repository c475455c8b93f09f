from __future__ import annotations

import pytest

from story_to_video.jsonextract import MAX_REPLY_CHARS, JSONExtractError, extract_json_object


@pytest.mark.parametrize("text", [
    '{"a": 1}',
    '```json\n{"a": 1}\n```',
    'Sure! Here is the plan:\n{"a": 1}\nHope this helps {not json}',
    'noise { broken {"a": 1}',
])
def test_finds_the_object(text: str) -> None:
    assert extract_json_object(text) == {"a": 1}


def test_braces_and_quotes_inside_strings_survive() -> None:
    text = 'x {"a": "he said \\"{hi}\\" \u00e9\u6f22 ../etc\\n"} y'
    assert extract_json_object(text) == {"a": 'he said "{hi}" \u00e9\u6f22 ../etc\n'}


@pytest.mark.parametrize(("text", "msg"), [
    ("", "reply is empty"),
    ('{"scenes": [{"title": "A", "shots": [', "no complete JSON object"),
    ("[1, 2]", "a list, not an object"),
    ("just prose", "no '{' found"),
])
def test_failures_say_why(text: str, msg: str) -> None:
    with pytest.raises(JSONExtractError, match=msg.replace("(", r"\(").replace("[", r"\[")):
        extract_json_object(text)


def test_ten_megabytes_is_refused_quickly() -> None:
    with pytest.raises(JSONExtractError, match="more than the"):
        extract_json_object("{" * (10 * 2**20))
    assert MAX_REPLY_CHARS < 10 * 2**20
