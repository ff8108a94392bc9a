"""Calls to the engines' control endpoints (vLLM's ``/collective_rpc``, ``/pause``, ``/weight_info`` …).

One engine's call becomes an :class:`RpcAnswer`, never an exception (the pool's fan-out,
``RolloutPool.engine_rpc``, gathers one per engine); callers that need every engine to succeed pass the
answers through :func:`require_ok`, the one place that turns failed answers into an error.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from rollout_plugin.errors import EngineError
from rollout_plugin.pool.core.engine_client import CallError, EngineClient

__all__ = ["DEV_MODE_HINT", "RpcAnswer", "require_ok", "rpc_one"]

DEV_MODE_HINT = "the engine needs vLLM's dev endpoints (engine.dev_mode=true, i.e. VLLM_SERVER_DEV_MODE=1)"


@dataclass(frozen=True)
class RpcAnswer:
    """One engine's answer to a control call: HTTP-ish ``status`` (502: no answer), its JSON ``body``, or
    ``error``; ``call`` says what was asked (``"POST /collective_rpc"``), so a failure can name it."""

    engine: str
    status: int
    body: Any = None
    error: str | None = None
    call: str = ""

    @property
    def ok(self) -> bool:
        return self.error is None and 200 <= self.status < 300

    @property
    def reason(self) -> str:
        """Why it failed, without the engine and call its error text may repeat."""
        text = self.error or f"HTTP {self.status}"
        for prefix in (f"{self.engine}: {self.call}: ", f"{self.engine}: "):
            if text.startswith(prefix):
                return text[len(prefix):]
        return text


async def rpc_one(client: EngineClient, path: str, body: dict | None, timeout_s: float | None,
                  method: str = "POST") -> RpcAnswer:
    """``method path`` on one engine; its failure is in the answer (one engine's failure is data)."""
    call = f"{method} {path}"
    admin = getattr(client, "admin", None)
    if admin is None:
        return RpcAnswer(client.name, 501, error=f"{client.name}: {call}: this engine client has no "
                                                 f"control endpoint (only HTTP engines do)", call=call)
    try:
        kwargs = {"timeout_s": timeout_s} if method == "POST" else {"timeout_s": timeout_s, "method": method}
        return RpcAnswer(client.name, 200, await admin(path, body, **kwargs), call=call)
    except CallError as exc:
        return RpcAnswer(client.name, exc.status or 502, error=str(exc), call=call)


def require_ok(answers: Sequence[RpcAnswer], *, error: type[Exception] = EngineError) -> list[RpcAnswer]:
    """``answers`` (in order) if every engine succeeded; else ``error`` naming each failed engine, the call
    and why — with the dev-mode fix when an engine lacked the endpoint (404)."""
    failed = [a for a in answers if not a.ok]
    if not failed:
        return list(answers)
    calls = sorted({a.call for a in failed if a.call})
    what = " and ".join(calls) if calls else "a control call"
    message = (f"{what} failed on {len(failed)} of {len(answers)} engines: "
               + "; ".join(f"{a.engine}: {a.reason}" for a in failed))
    if any(a.status == 404 for a in failed) and "dev_mode" not in message:
        message += f" ({DEV_MODE_HINT})"
    raise error(message)
