"""Which agentic session a gateway request belongs to, read from its headers: its turns share a home engine.

A caller names its session in ``X-Session-ID`` (the vLLM Router's ``consistent_hash`` key, what Ray Serve LLM
and kv-cache-tester send; ``x_session_id`` too, as Ray accepts it); header names match in any case. The
gateway makes it the request's ``Request.affinity`` key, so the pool sends the session's turns to the engine
holding its prefix cache and never packs them with another session's. ``X-Session-End: true`` (or ``1``) on
a turn ends the session once that turn is over: its home is freed at once instead of at
``pool.affinity_ttl_s`` or when ``pool.affinity_max_keys`` pushes it out. Pure: headers in, a session out.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

__all__ = ["Session", "SessionHeaderError", "read_session", "session_key"]

ID_HEADERS = ("x-session-id", "x_session_id")
END_HEADER = "x-session-end"
END_VALUES = {"true": True, "1": True, "false": False, "0": False}
# The adapters' keys are "session:<verl request id>" and "group:<prompt hash>" (adapters/verl/router.py
# _affinity, adapters/common/translate.py group_key): a prefix of its own keeps a caller's id off them.
KEY_PREFIX = "gateway-session:"


class SessionHeaderError(ValueError):
    """A session header the gateway cannot read (answered 400: a guessed session would split one's turns)."""


@dataclass(frozen=True)
class Session:
    id: str
    end: bool = False  # this turn is the session's last: free its home when it is over

    @property
    def key(self) -> str:
        return session_key(self.id)


def session_key(session_id: str) -> str:
    """The pool's affinity key (``Request.affinity``, ``RolloutPool.end_session``) of a gateway session."""
    return KEY_PREFIX + session_id


def read_session(headers: Mapping[str, str]) -> Session | None:
    """The request's session, or ``None`` (no session header: the request goes as any other)."""
    lowered = {k.lower(): v for k, v in headers.items()}
    ids = {lowered[h].strip() for h in ID_HEADERS if h in lowered}
    end = lowered.get(END_HEADER)
    if not ids:
        if end is not None:
            raise SessionHeaderError("X-Session-End needs X-Session-ID: which session ends?")
        return None
    if len(ids) > 1:
        raise SessionHeaderError(f"X-Session-ID and x_session_id name different sessions: {sorted(ids)}")
    (session_id,) = ids
    if not session_id:
        raise SessionHeaderError("X-Session-ID is empty: send the session's id, or no header")
    if end is not None and end.strip().lower() not in END_VALUES:
        raise SessionHeaderError(f"X-Session-End={end!r}: send true or 1 (end the session), false or 0")
    return Session(session_id, END_VALUES.get((end or "false").strip().lower(), False))
