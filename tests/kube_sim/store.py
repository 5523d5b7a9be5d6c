"""The simulated cluster's object store: objects, resourceVersions, selectors and the watch history.

One global resourceVersion counter is bumped by every write, as etcd's revision is in a real cluster. Every write
is appended to a bounded history so that a watch can resume from a resourceVersion; a watch from a version older
than the history gets a 410 Gone, exactly the case a client has to handle after a long disconnect.

Callers never hold references into the store: reads return deep copies and writes replace whole objects, so a
controller cannot mutate state behind the back of the history.
"""

from __future__ import annotations

import asyncio
import copy
import re
import uuid
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

Obj = dict[str, Any]
Key = tuple[str, str, str]  # (resource, namespace or "", name)

# Kubernetes' own default; real clusters keep roughly five minutes of events.
DEFAULT_HISTORY = 1000


def now_ts() -> str:
    """An RFC 3339 timestamp with second precision, as the API server renders metav1.Time."""
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def obj_key(resource: str, obj: Obj) -> Key:
    meta = obj["metadata"]
    return (resource, meta.get("namespace", ""), meta["name"])


class SelectorError(ValueError):
    """A label or field selector that the API server would reject with 400."""


@dataclass(frozen=True)
class Requirement:
    key: str
    op: str  # "=", "!=", "in", "notin", "exists", "!exists"
    values: frozenset[str] = frozenset()

    def matches(self, labels: dict[str, str]) -> bool:
        present = self.key in labels
        value = labels.get(self.key)
        if self.op == "exists":
            return present
        if self.op == "!exists":
            return not present
        if self.op in ("=", "in"):
            return present and value in self.values
        # "!=" and "notin" match objects without the label, as in Kubernetes.
        return value not in self.values


_SET_RE = re.compile(r"^\s*([\w./-]+)\s+(in|notin)\s+\(([^)]*)\)\s*$")
_EQ_RE = re.compile(r"^\s*([\w./-]+)\s*(==|=|!=)\s*([\w.-]*)\s*$")
_EXISTS_RE = re.compile(r"^\s*(!?)\s*([\w./-]+)\s*$")


def _split_top_level(text: str) -> Iterator[str]:
    """Split on commas that are not inside an `in (...)` value list."""
    depth, start = 0, 0
    for i, char in enumerate(text):
        if char == "(":
            depth += 1
        elif char == ")":
            depth -= 1
        elif char == "," and depth == 0:
            yield text[start:i]
            start = i + 1
    yield text[start:]


def parse_label_selector(text: str | None) -> list[Requirement]:
    """Parse `a=b,c!=d,e in (x,y),f notin (z),g,!h`; an empty selector matches everything."""
    if not text or not text.strip():
        return []
    requirements: list[Requirement] = []
    for part in _split_top_level(text):
        if m := _SET_RE.match(part):
            values = frozenset(v.strip() for v in m.group(3).split(",") if v.strip())
            requirements.append(Requirement(m.group(1), m.group(2), values))
        elif m := _EQ_RE.match(part):
            op = "!=" if m.group(2) == "!=" else "="
            requirements.append(Requirement(m.group(1), op, frozenset([m.group(3)])))
        elif m := _EXISTS_RE.match(part):
            requirements.append(Requirement(m.group(2), "!exists" if m.group(1) else "exists"))
        else:
            raise SelectorError(f"unable to parse requirement: {part.strip()!r}")
    return requirements


def parse_field_selector(text: str | None) -> list[tuple[str, bool, str]]:
    """Parse `metadata.name=x,status.phase!=Running` into (path, equal, value) triples."""
    if not text or not text.strip():
        return []
    result: list[tuple[str, bool, str]] = []
    for part in text.split(","):
        m = re.match(r"^\s*([\w.]+)\s*(==|=|!=)\s*(.*?)\s*$", part)
        if not m:
            raise SelectorError(f"invalid field selector: {part.strip()!r}")
        result.append((m.group(1), m.group(2) != "!=", m.group(3)))
    return result


def _field_value(obj: Obj, path: str) -> str:
    node: Any = obj
    for step in path.split("."):
        node = node.get(step) if isinstance(node, dict) else None
    return "" if node is None else str(node)


@dataclass(frozen=True)
class Selector:
    labels: list[Requirement] = field(default_factory=list)
    fields: list[tuple[str, bool, str]] = field(default_factory=list)

    @classmethod
    def parse(cls, label_selector: str | None = None, field_selector: str | None = None) -> Selector:
        return cls(parse_label_selector(label_selector), parse_field_selector(field_selector))

    def matches(self, obj: Obj) -> bool:
        labels = obj["metadata"].get("labels") or {}
        if not all(r.matches(labels) for r in self.labels):
            return False
        return all((_field_value(obj, path) == value) == equal for path, equal, value in self.fields)


@dataclass(frozen=True)
class Event:
    rv: int
    type: str  # ADDED, MODIFIED, DELETED
    resource: str
    obj: Obj


class Gone(Exception):
    """The requested resourceVersion is older than the retained history."""

    def __init__(self, requested: int, oldest: int) -> None:
        super().__init__(f"too old resource version: {requested} ({oldest})")


class Store:
    """All objects of the simulated cluster, keyed by (resource, namespace, name)."""

    def __init__(self, history: int = DEFAULT_HISTORY) -> None:
        self.rv = 0
        self._objects: dict[Key, Obj] = {}
        self._history: deque[Event] = deque(maxlen=history)
        self._compacted = 0  # events with rv <= this are no longer available to watches
        self._subscribers: set[asyncio.Queue[Event | None]] = set()
        self.watching = 0  # open watch streams, maintained by the API layer

    # reads

    def get(self, resource: str, namespace: str, name: str) -> Obj | None:
        obj = self._objects.get((resource, namespace, name))
        return copy.deepcopy(obj) if obj is not None else None

    def objects(self, resource: str, namespace: str | None = None, selector: Selector | None = None) -> list[Obj]:
        found = [
            copy.deepcopy(obj)
            for (res, ns, _), obj in sorted(self._objects.items())
            if res == resource
            and (namespace is None or ns == namespace)
            and (selector is None or selector.matches(obj))
        ]
        return found

    # writes

    def create(self, resource: str, obj: Obj) -> Obj:
        meta = obj.setdefault("metadata", {})
        meta["uid"] = str(uuid.uuid4())
        meta["creationTimestamp"] = now_ts()
        meta.setdefault("generation", 1)
        return self._write(resource, obj, "ADDED")

    def update(self, resource: str, obj: Obj) -> Obj:
        """Replace an object; a write that changes nothing does not bump the resourceVersion."""
        key = obj_key(resource, obj)
        current = self._objects.get(key)
        if current is None:
            raise KeyError(key)
        candidate = copy.deepcopy(obj)
        candidate["metadata"]["resourceVersion"] = current["metadata"]["resourceVersion"]
        if candidate == current:
            return copy.deepcopy(current)
        return self._write(resource, candidate, "MODIFIED")

    def remove(self, resource: str, namespace: str, name: str) -> Obj | None:
        obj = self._objects.pop((resource, namespace, name), None)
        if obj is None:
            return None
        self.rv += 1
        obj["metadata"]["resourceVersion"] = str(self.rv)
        self._record(Event(self.rv, "DELETED", resource, copy.deepcopy(obj)))
        return copy.deepcopy(obj)

    def mark_deleting(self, resource: str, obj: Obj, grace_seconds: int | None = None) -> Obj:
        """Set deletionTimestamp (once); the object goes away when its finalizers and its owner allow it."""
        meta = obj["metadata"]
        if not meta.get("deletionTimestamp"):
            meta["deletionTimestamp"] = now_ts()
            if grace_seconds is not None:
                meta["deletionGracePeriodSeconds"] = grace_seconds
        return self.update(resource, obj)

    def remove_finalizer(self, resource: str, obj: Obj, finalizer: str) -> Obj | None:
        """Drop one finalizer; like the API server, delete the object once none are left and it is deleting."""
        meta = obj["metadata"]
        meta["finalizers"] = [f for f in meta.get("finalizers") or [] if f != finalizer]
        if not meta["finalizers"]:
            del meta["finalizers"]
            if meta.get("deletionTimestamp"):
                # The API server deletes in the same write: watchers see one DELETED, no MODIFIED before it.
                key = obj_key(resource, obj)
                meta["resourceVersion"] = self._objects[key]["metadata"]["resourceVersion"]
                self._objects[key] = copy.deepcopy(obj)
                return self.remove(*key)
        return self.update(resource, obj)

    def _write(self, resource: str, obj: Obj, event_type: str) -> Obj:
        self.rv += 1
        obj["metadata"]["resourceVersion"] = str(self.rv)
        stored = copy.deepcopy(obj)
        self._objects[obj_key(resource, obj)] = stored
        self._record(Event(self.rv, event_type, resource, copy.deepcopy(stored)))
        return copy.deepcopy(stored)

    # watch support

    def _record(self, event: Event) -> None:
        if self._history.maxlen is not None and len(self._history) == self._history.maxlen:
            self._compacted = self._history[0].rv
        self._history.append(event)
        for queue in self._subscribers:
            queue.put_nowait(event)

    def compact(self) -> None:
        """Forget all history, as etcd compaction does; any watch from an older version now gets 410."""
        self._history.clear()
        self._compacted = self.rv

    def subscribe(self, since: int | None) -> tuple[list[Event], asyncio.Queue[Event | None]]:
        """Return the events after `since` plus a queue of future ones, atomically (no await in between)."""
        if since is not None and since < self._compacted:
            raise Gone(since, self._compacted + 1)
        backlog = [e for e in self._history if since is not None and e.rv > since]
        queue: asyncio.Queue[Event | None] = asyncio.Queue()
        self._subscribers.add(queue)
        return backlog, queue

    def unsubscribe(self, queue: asyncio.Queue[Event | None]) -> None:
        self._subscribers.discard(queue)

    def cut_watches(self) -> int:
        """End every open watch stream now (other subscribers just wake up); returns how many were open."""
        for queue in self._subscribers:
            queue.put_nowait(None)
        return self.watching

    def dump(self) -> dict[str, list[Obj]]:
        result: dict[str, list[Obj]] = {}
        for (resource, _, _), obj in sorted(self._objects.items()):
            result.setdefault(resource, []).append(copy.deepcopy(obj))
        return result
