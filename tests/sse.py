"""A Server-Sent Events reader for the tests of the API's live streams, over a real HTTP response."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from typing import Any

import httpx


@dataclass
class Message:
    id: int | None
    event: str | None
    data: dict[str, Any] | None
    comment: str | None
    received_at: float  # time.time(), comparable with the event's created_at


class SseReader:
    def __init__(self, response: httpx.Response) -> None:
        self.response = response
        self._lines = response.aiter_lines()

    async def next(self) -> Message | None:
        """The next message or comment; None when the server ends the stream."""
        fields: dict[str, str] = {}
        comment = None
        async for line in self._lines:
            if line == "":
                if fields or comment is not None:
                    data = json.loads(fields["data"]) if "data" in fields else None
                    raw_id = fields.get("id")
                    return Message(int(raw_id) if raw_id else None, fields.get("event"), data, comment, time.time())
                continue
            if line.startswith(":"):
                comment = line[1:].strip()
                continue
            name, _, value = line.partition(":")
            fields[name] = value.removeprefix(" ")
        return None

    async def all(self) -> list[Message]:
        messages = []
        while (message := await self.next()) is not None:
            messages.append(message)
        return messages
