"""``rollout-plugin serve``: the pool behind one OpenAI-compatible endpoint.

Launches (or attaches to) the engines as a :class:`RolloutPool` would, warms them, then serves
:mod:`rollout_plugin.gateway.app` with uvicorn on the pool's event loop. Bound to 127.0.0.1 unless
told otherwise; any other address needs ``api_key``. On exit (Ctrl-C, SIGTERM) uvicorn stops
first, then the pool stops every engine it launched.
"""

from __future__ import annotations

import functools
import importlib.util
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from rollout_plugin.config.schema import ControllerConfig, EngineConfig, PoolConfig
from rollout_plugin.config.validate import Problems, check_engine, check_pool
from rollout_plugin.errors import InputError
from rollout_plugin.gateway.relay import PassThroughClient, Relay
from rollout_plugin.pool import RolloutPool

log = logging.getLogger(__name__)

LOOPBACK = ("127.0.0.1", "localhost", "::1")


@dataclass
class ServeConfig:
    engine: EngineConfig = field(default_factory=EngineConfig)
    pool: PoolConfig = field(default_factory=PoolConfig)
    controller: ControllerConfig = field(default_factory=ControllerConfig)
    host: str = "127.0.0.1"  # another address exposes the engines: api_key is then required
    port: int = 8000  # 0: a free port (printed, and written to ready_file)
    api_key: Optional[str] = None  # callers send Authorization: Bearer <api_key>
    served_model_name: Optional[str] = None  # the name /v1/models reports; unset: the engines' model
    ready_file: Optional[str] = None  # the gateway's URL is written here once it accepts requests
    log_level: str = "INFO"  # DEBUG, INFO, WARNING or ERROR
    # Non-streamed completions that use only what the pool models go in as its own requests, so concurrent
    # callers' prompts pack into one engine call (held up to pool.pack_timeout_s); false: every body passes
    # through alone, as sent.
    pack_callers: bool = True


def validate_serve(cfg: ServeConfig) -> None:
    p = Problems()
    check_engine(cfg.engine, p)
    check_pool(cfg.pool, p)
    if not 0 <= cfg.port <= 65535:
        p.add("port", cfg.port, "must be 0 (a free port) or in [1, 65535]", 8000)
    if cfg.host not in LOOPBACK and not cfg.api_key:
        p.add("api_key", cfg.api_key, f"required when host={cfg.host!r} (not loopback): anyone who reaches it "
                                      f"could use the engines", "<a secret>")
    p.raise_if_any()


def _app_and_server(pool: RolloutPool, relay: Relay, cfg: ServeConfig, port: int, on_started: Callable[[], None]):
    import uvicorn

    from rollout_plugin.gateway.app import Gateway, build_app

    model = cfg.served_model_name or next(iter(relay.clients.values())).model
    gw = Gateway(pool, relay, model=model, max_model_len=cfg.engine.max_model_len, api_key=cfg.api_key,
                 world_size=len(relay.clients) * cfg.engine.tensor_parallel_size, pack_callers=cfg.pack_callers)

    class Server(uvicorn.Server):
        async def startup(self, sockets=None) -> None:
            await super().startup(sockets)
            if not self.should_exit:  # startup failed (port taken): no announcement
                on_started()

    config = uvicorn.Config(build_app(gw), host=cfg.host, port=port, log_level="warning", access_log=False,
                            lifespan="off", timeout_keep_alive=30)
    return Server(config)


async def serve(cfg: ServeConfig) -> None:
    """Run until interrupted. Raises :class:`RolloutPluginError` for bad config before any engine starts."""
    validate_serve(cfg)
    missing = [m for m in ("fastapi", "uvicorn") if importlib.util.find_spec(m) is None]
    if missing:  # checked before any engine starts
        raise InputError(f"rollout-plugin serve needs {' and '.join(missing)}: pip install 'rollout-plugin[serve]'")
    from rollout_plugin.pool import reserve_ports

    port = cfg.port or reserve_ports(cfg.host, 0, 1)[0]
    url = f"http://{cfg.host}:{port}"
    relay = Relay()

    def announce() -> None:
        log.info("gateway: starting -> serving %s/v1 (%d engine(s))", url, len(relay.clients))
        print(f"rollout-plugin serve: {url}/v1 ({len(relay.clients)} engine(s)); Ctrl-C stops it", flush=True)
        if cfg.ready_file:
            Path(cfg.ready_file).write_text(url + "\n", encoding="utf-8")

    factory = functools.partial(PassThroughClient, relay=relay)
    async with RolloutPool(cfg.engine, cfg.pool, cfg.controller, client_factory=factory) as pool:
        await _app_and_server(pool, relay, cfg, port, announce).serve()
    log.info("gateway: serving -> stopped")
