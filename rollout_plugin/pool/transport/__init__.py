"""HTTP, SSE and control calls: vLLM's answers turned into the verdicts of
:mod:`rollout_plugin.pool.core.engine_client`.

Exported here for relays (the gateway) that speak the same wire: one verdict mapping for both paths; and
:func:`require_ok`, the one check that every engine answered a control call.
"""

from rollout_plugin.pool.transport.http import JSON_HEADERS, HttpEngineClient, json_body, raise_for_status
from rollout_plugin.pool.transport.rpc import RpcAnswer, require_ok
from rollout_plugin.pool.transport.sse import DONE, StreamedAnswer, aiter_events

__all__ = ["DONE", "JSON_HEADERS", "HttpEngineClient", "RpcAnswer", "StreamedAnswer", "aiter_events",
           "json_body", "raise_for_status", "require_ok"]
