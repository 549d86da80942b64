"""A question with the conversation before it, as OpenAI's chat messages carry it.

The stream's memory is the video in the first user turn; its system prompt is the stream's own
(its attention sinks were computed with it, so a different one cannot be swapped in after the
fact). The earlier turns enter the prompt after the memory, as the chat template renders them,
and a client's system message that differs from the stream's system prompt opens the first user
turn's text, right after the memory:

    [stream's system prompt | video memory] client system message, turn 1 text, assistant answer 1,
    ..., user question, assistant header

(A one-shot video's stream is created with the client's system message as its system prompt.)

Retrieval uses the last question alone; the earlier turns count in the prompt (usage.prompt_tokens).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

MAX_HISTORY_TOKENS = 2048  # the rendered conversation after the video, beyond the question's own limit


@dataclass(frozen=True)
class Turn:
    role: Literal["user", "assistant"]
    text: str


@dataclass(frozen=True)
class Conversation:
    question: str  # the last user message: what retrieval looks for
    turns: tuple[Turn, ...] = ()  # earlier turns, oldest first (the first user turn carries the video)
    system: str | None = None  # the client's system message

    def messages(self, system_prompt: str | None) -> list[dict]:
        """Chat-template messages with one video placeholder, in the first user turn."""
        messages = [] if system_prompt is None else [{"role": "system", "content": [{"type": "text", "text": system_prompt}]}]
        for turn in (*self.turns, Turn("user", self.question)):
            content = [{"type": "text", "text": turn.text}]
            if turn.role == "user" and len(messages) == (system_prompt is not None):  # the first turn
                if self.system and self.system != system_prompt:
                    content[0]["text"] = f"{self.system}\n\n{turn.text}"
                content.insert(0, {"type": "video"})
            messages.append({"role": turn.role, "content": content})
        return messages
