"""Scripted stand-ins for the service Protocols (used where the planner's logic, not the
transport, is under test; transports are tested against real servers)."""

from __future__ import annotations

import json
from typing import Any

from story_to_video.llm.base import Completion, Message, TokenCallback


class ScriptedLLM:
    """Answers complete_json with the given replies in order and records what it was sent."""

    def __init__(self, replies: list[str], story: str = "A keeper and a whale meet.") -> None:
        self.replies = list(replies)
        self.story = story
        self.sent: list[list[Message]] = []
        self.schemas: list[dict[str, Any]] = []

    @property
    def description(self) -> str:
        return "scripted"

    def complete(self, messages: list[Message], *, max_tokens: int, temperature: float,
                 on_token: TokenCallback | None = None,
                 deadline_s: float | None = None) -> Completion:
        self.sent.append(messages)
        for word in self.story.split():
            if on_token:
                on_token(word)
        return Completion(self.story, len(self.story.split()), 0.01)

    def complete_json(self, messages: list[Message], schema: dict[str, Any], *,
                      max_tokens: int, temperature: float,
                      deadline_s: float | None = None) -> Completion:
        self.sent.append(messages)
        self.schemas.append(schema)
        if not self.replies:
            raise AssertionError("ScriptedLLM ran out of replies")
        return Completion(self.replies.pop(0), 10, 0.01, "scripted")

    def models(self) -> list[str]:
        return ["scripted"]


def bible_json(names: tuple[str, ...] = ("Mara", "Whale")) -> str:
    return json.dumps({
        "style": "cinematic, 35mm film", "palette": "teal and amber, low sun",
        "characters": [{"name": n, "look": f"{n} look, tall", "wardrobe": "grey coat"}
                       for n in names],
    })


def scenes_json(n: int = 2, shots: int = 1, **shot: Any) -> str:
    base = {"action": "Mara walks along the pier at dusk", "camera": "pan-left",
            "characters": ["Mara"]}
    base.update(shot)
    return json.dumps({"scenes": [
        {"title": f"Scene {i}", "setting": "a stone pier, dusk", "shots": [base] * shots}
        for i in range(n)
    ]})
