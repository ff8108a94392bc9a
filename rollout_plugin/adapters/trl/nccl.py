"""``weights.transport=nccl``: the trainer's weights to every engine over vLLM's NCCL weight-transfer engine.

NOT YET RUN ON A GPU. The call sequence is tested on CPU against recording servers with the NCCL
communicator mocked (``tests/test_trl_units.py``); the folder transport stays the default.

vLLM 0.32's own pieces do the work: engines started with
``--weight-transfer-config '{"backend": "nccl"}'`` (and dev mode) serve ``/init_weight_transfer_engine``,
``/start_weight_update``, ``/update_weights`` and ``/finish_weight_update``; the trainer side is
vLLM's :class:`NCCLTrainerWeightTransferEngine`, fed by a :class:`WeightSource` over TRL's gathered
parameters (:mod:`.gather`) and talking to the engines through :class:`PoolWeightSyncClient` — vLLM's
``VLLMWeightSyncClient`` protocol over the pool. One NCCL group holds the trainer's rank 0 (the
sender) and every worker of every engine: engine ``i``'s workers sit at rank offset
``1 + world sizes of engines 0..i-1``, so one broadcast reaches all engines. Every trainer rank runs
:meth:`NcclTransport.send` (the gather is a collective under ZeRO-3 / FSDP); only rank 0 sends.
The pool is paused and drained around the transfer (:meth:`RolloutPool.weight_update`).

The group is formed at the first send with the engines of that moment. The pool has no source to refit
a restarted engine from (as it has a folder): it comes back stale and waits for the next sync
(:meth:`RolloutPool.expect_weight_pushes`, announced at the first send), which closes the old group
(vLLM's ``/shutdown_weight_transfer_engine``; the old process's workers are gone and NCCL has no peer
timeout), forms a new one with every engine, broadcasts to all and then checks the stale ones back in
(:meth:`RolloutPool.rejoin_after_push`). Limit: an engine that is dead or restarting *during* a sync
fails that sync (its control calls find no server).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections.abc import Iterator
from concurrent.futures import FIRST_EXCEPTION, Future, ThreadPoolExecutor, wait
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

from vllm.distributed.weight_transfer import nccl_engine
from vllm.distributed.weight_transfer.base import ParamMeta, WeightSource

from rollout_plugin.adapters.common.ranks import everyone, on_main
from rollout_plugin.adapters.common.weights import SyncRecord
from rollout_plugin.adapters.trl.engines import engine_get, engine_post_each
from rollout_plugin.adapters.trl.gather import gathered_params, sharding
from rollout_plugin.errors import TrainerAdapterError
from rollout_plugin.pool import require_ok

if TYPE_CHECKING:
    import torch

    from rollout_plugin.pool import SyncRolloutPool

__all__ = ["NcclOptions", "NcclTransport", "PoolWeightSyncClient", "TrainerSource", "held_update", "send_weights",
           "trainer_init"]

log = logging.getLogger(__name__)

DEFAULT_PORT = 51216  # TRL's vllm_group_port
PUSHED = "the trainer's NCCL broadcast at the next weight sync"


async def _expect_pushes(pool: Any) -> None:
    pool.expect_weight_pushes(PUSHED)


async def _stale_engines(pool: Any) -> list[str]:
    return pool.stale_engines()


async def _rejoin(pool: Any) -> list[str]:
    return await pool.rejoin_after_push()


async def _close_group(pool: Any) -> None:
    await pool.engine_rpc("/shutdown_weight_transfer_engine")  # never raises: a restarted engine has no group


@dataclass(frozen=True)
class NcclOptions:
    host: str | None = None  # the address every engine reaches trainer rank 0 at; unset: this host's IP
    port: int = DEFAULT_PORT
    # vLLM's packed transfer: receive buffers per engine worker, outside its gpu_memory_utilization
    # (weights.nccl_buffer_mib / nccl_num_buffers; vLLM's defaults: 2 × 1 GiB).
    buffer_bytes: int = 1 << 30
    num_buffers: int = 2


class _BodyFailed(Exception):
    """Raised inside the pool's weight update when the blocking body failed: the pool then keeps the old version."""


@contextlib.contextmanager
def held_update(pool: SyncRolloutPool, version: int, *, abort: bool = False) -> Iterator[None]:
    """``pool.weight_update(version)`` held open around blocking code on this thread: pause and drain on
    entry; on exit resume, under ``version`` if the body succeeded (a failed body keeps the old one)."""
    entered: Future[None] = Future()
    release = threading.Event()
    failed = False

    async def hold(p: Any) -> None:
        async with p.weight_update(version, abort=abort):
            entered.set_result(None)
            await asyncio.to_thread(release.wait)  # the loop stays free for the body's own pool calls
            if failed:
                raise _BodyFailed

    def ended(f: Future) -> None:
        if not entered.done():
            entered.set_exception(f.exception() or TrainerAdapterError("the weight update ended before it began"))

    with ThreadPoolExecutor(1, thread_name_prefix="weight-update") as ex:
        held = ex.submit(pool.run, hold)
        held.add_done_callback(ended)
        entered.result()
        try:
            yield
        except BaseException:
            failed = True
            raise
        finally:
            release.set()
            try:
                held.result()
            except _BodyFailed:
                pass  # the body's own error is on its way out


class PoolWeightSyncClient:
    """vLLM's ``VLLMWeightSyncClient`` protocol (the four control calls) over every engine of the pool at once."""

    def __init__(self, pool: SyncRolloutPool, world_sizes: list[int], *, timeout_s: float | None = 600.0):
        self.pool = pool
        self.world_sizes = world_sizes
        self.timeout_s = timeout_s

    def _all(self, path: str, body: dict) -> list:
        timeout = self.timeout_s
        return [a.body for a in require_ok(self.pool.run(lambda p: p.engine_rpc(path, body, timeout_s=timeout)))]

    def init_weight_transfer_engine(self, init_info: dict[str, Any]) -> None:
        """One rendezvous for all engines: the same group, each engine's workers at their own rank offset."""
        offsets = [1 + sum(self.world_sizes[:i]) for i in range(len(self.world_sizes))]
        bodies = [{"init_info": {**init_info, "rank_offset": off}} for off in offsets]
        engine_post_each(self.pool, "/init_weight_transfer_engine", bodies, timeout_s=self.timeout_s or 600.0)

    def start_weight_update(self) -> None:
        self._all("/start_weight_update", {})

    def update_weights(self, update_info: Any) -> None:
        self._all("/update_weights", {"update_info": update_info})  # returns when the broadcast has landed

    def finish_weight_update(self, weight_version: str | None = None) -> None:
        # No version tag here: the pool's weight_update sets each engine's version and reads it back on exit.
        self._all("/finish_weight_update", {} if weight_version is None else {"weight_version": weight_version})


class TrainerSource(WeightSource):
    """vLLM's ``WeightSource`` over the trainer's model, gathered as TRL gathers it; times the gather."""

    def __init__(self, accelerator: Any):
        self.accelerator = accelerator
        self.model: Any = None  # set before each send
        self._meta: list[ParamMeta] | None = None
        self.gather_s = 0.0  # time spent materializing tensors in the last pass

    def metadata(self) -> list[ParamMeta]:
        # Under ZeRO-3 a partitioned parameter's own shape is empty: one gathered pass learns the real ones
        # (TRL's server mode does the same on its first sync). Names, dtypes and shapes do not change later.
        if self._meta is None:
            self._meta = [ParamMeta(n, t.dtype, tuple(t.shape)) for n, t in self._timed()]
        return self._meta

    def __iter__(self) -> Iterator[tuple[str, torch.Tensor]]:
        return self._timed()

    def _timed(self) -> Iterator[tuple[str, torch.Tensor]]:
        self.gather_s = 0.0
        it = gathered_params(self.model, self.accelerator)
        while True:
            t0 = time.perf_counter()
            try:
                item = next(it)
            except StopIteration:
                return
            finally:
                self.gather_s += time.perf_counter() - t0
            yield item


def trainer_init(init: Any, *, client: Any, source: WeightSource) -> Any:
    """vLLM's ``NCCLTrainerWeightTransferEngine.trainer_init``, except that an engine-side init error ends it at
    once: vLLM waits for the engines' answer only after its own rendezvous, which never completes when a worker
    failed to join — rank 0 would block there for good. The rendezvous runs on a daemon thread, left behind."""
    cls = nccl_engine.NCCLTrainerWeightTransferEngine
    engine = cls(client=client, source=source, is_sender=init.is_sender, packed=init.packed,
                 packed_buffer_size_bytes=init.packed_buffer_size_bytes, packed_num_buffers=init.packed_num_buffers)
    if not engine.is_sender:
        return engine
    worker = nccl_engine.NCCLWeightTransferInitInfo(
        master_address=init.master_address, master_port=init.master_port, rank_offset=1, world_size=init.world_size,
        packed=init.packed, packed_buffer_size_bytes=init.packed_buffer_size_bytes,
        packed_num_buffers=init.packed_num_buffers)
    engines: Future[None] = Future()
    group: Future[Any] = Future()

    def run(fn: Any, arg: Any, into: Future) -> None:
        try:
            into.set_result(fn(arg))
        except BaseException as exc:
            into.set_exception(exc)

    payload = nccl_engine.worker_init_payload(worker)
    threading.Thread(target=run, args=(client.init_weight_transfer_engine, payload, engines), daemon=True).start()
    threading.Thread(target=run, args=(nccl_engine.open_trainer_endpoint, init, group), daemon=True).start()
    wait([engines, group], return_when=FIRST_EXCEPTION)
    if engines.done() and engines.exception() is not None:
        raise engines.exception()  # type: ignore[misc]  # the workers never join: do not wait for them
    engine.model_update_group = group.result()
    engines.result()
    return engine


class _EnginesLeft(Exception):
    """The engines' ``/update_weights`` failed during the broadcast: rank 0 stops sending."""


def send_weights(engine: Any, source: WeightSource, accelerator: Any, collectives: Any = None) -> None:
    """vLLM's ``NCCLTrainerWeightTransferEngine.send_weights``, in phases that each end in a status exchange
    (:func:`.ranks.everyone`), so every rank learns of a failure before the next collective: an HTTP error on rank 0
    (``/start_weight_update``, ``/update_weights``) would otherwise send it on while the other ranks wait in
    ZeRO-3 / FSDP gathers it never joins. A broadcast that fails part-way still walks the rest of the model on rank
    0 (the others' gathers complete), then every rank fails with the cause."""
    main = accelerator.is_main_process

    def begin() -> None:
        source.metadata()  # a collective on its first pass (ZeRO-3 shapes): every rank
        if main:
            engine.client.start_weight_update()

    everyone(accelerator, begin, collectives)
    everyone(accelerator, lambda: _transfer(engine, source) if main else _replay(source), collectives)
    everyone(accelerator, lambda: engine.client.finish_weight_update() if main else None, collectives)
    engine._post_send_sync()


def _replay(source: WeightSource) -> None:
    for _ in source:  # a non-sender only joins the gathers
        pass


def _transfer(engine: Any, source: WeightSource) -> None:
    """Rank 0: ``/update_weights`` on the engines while broadcasting (vLLM's order); on a failure the rest of the
    source is still walked so the other ranks' gathers complete."""
    meta = source.metadata()
    info = nccl_engine.NCCLWeightTransferUpdateInfo(names=[m.name for m in meta],
                                                    dtype_names=[str(m.dtype).split(".")[-1] for m in meta],
                                                    shapes=[list(m.shape) for m in meta])
    it = iter(source)
    exe = ThreadPoolExecutor(1, thread_name_prefix="update-weights")
    try:
        received = exe.submit(engine.client.update_weights, asdict(info))

        def pairs() -> Iterator[tuple[str, Any]]:
            for item in it:
                if received.done() and received.exception() is not None:
                    raise _EnginesLeft  # no peer is receiving: broadcasting on would wait forever
                yield item

        try:
            _broadcast(engine, engine._checked_iter(pairs(), meta))
        except BaseException:
            _replay(it)  # type: ignore[arg-type]  # keep the other ranks' gathers company to the end
            if received.done() and received.exception() is not None:
                raise received.exception() from None  # type: ignore[misc]  # the engines' error is the cause
            raise
        received.result()
    finally:
        exe.shutdown(wait=False)  # as vLLM: never join a receive that may be stuck in NCCL


def _broadcast(engine: Any, pairs: Iterator[tuple[str, Any]]) -> None:
    if engine.packed:
        nccl_engine.packed_nccl_broadcast_producer(iterator=pairs, group=engine.model_update_group, src=0,
                                                   post_iter_func=lambda item: item[1],
                                                   buffer_size_bytes=engine.packed_buffer_size_bytes,
                                                   num_buffers=engine.packed_num_buffers)
        return
    import torch

    stream = torch.cuda.current_stream()
    for _, tensor in pairs:
        engine.model_update_group.broadcast(tensor if tensor.is_contiguous() else tensor.contiguous(), src=0,
                                            stream=stream)


class NcclTransport:
    """Publishes weights over NCCL; every rank calls :meth:`send`, the main process holds the pool."""

    def __init__(self, pool: SyncRolloutPool | None, accelerator: Any, *, options: NcclOptions | None = None,
                 abort_inflight: bool = False, timeout_s: float | None = 600.0, collectives: Any = None):
        if accelerator is None:
            raise TrainerAdapterError("weights.transport=nccl needs the trainer's accelerator (use attach())")
        self.pool = pool
        self.accelerator = accelerator
        self.options = options or NcclOptions()
        self.abort_inflight = abort_inflight
        self.timeout_s = timeout_s
        self.source = TrainerSource(accelerator)
        self.client: PoolWeightSyncClient | None = None
        self.engine: Any = None  # vLLM's NCCLTrainerWeightTransferEngine, opened at the first send
        self.collectives = collectives  # None: accelerate's (tests pass threads' own)

    def _world(self) -> tuple[list[int], int]:
        """Each engine's worker count (its /get_world_size), checked for a weight-transfer engine."""
        assert self.pool is not None
        infos = engine_get(self.pool, "/server_info?config_format=json")
        missing = [name for name, info in infos.items() if not (info.get("vllm_config") or {}).get(
            "weight_transfer_config")]
        if missing:
            raise TrainerAdapterError(f"{', '.join(missing)}: the vLLM server has no weight-transfer engine "
                                      f"(weights.transport=nccl). Restart it with "
                                      "`--weight-transfer-config '{\"backend\": \"nccl\"}'` (engine.extra_args), "
                                      "or use weights.transport=folder")
        sizes = [int(answer["world_size"]) for answer in engine_get(self.pool, "/get_world_size").values()]
        return sizes, 1 + sum(sizes)

    def _open(self) -> None:
        acc = self.accelerator
        main = acc.is_main_process

        def connect() -> int:
            sizes, world = self._world()
            self.client = PoolWeightSyncClient(self.pool, sizes, timeout_s=self.timeout_s)
            self.pool.run(_expect_pushes)  # an engine that restarts stale waits for the next sync
            return world

        world = on_main(acc, connect)  # non-senders build no group, but every rank agrees on its size
        host = self.options.host
        if host is None:
            from vllm.utils.network_utils import get_ip

            host = get_ip()
        init = nccl_engine.NCCLTrainerInitInfo(rank=acc.process_index, master_address=host,
                                               master_port=self.options.port, world_size=world,
                                               packed_buffer_size_bytes=self.options.buffer_bytes,
                                               packed_num_buffers=self.options.num_buffers)
        # Non-sender ranks hold the client but never call it (vLLM guards every RPC on is_sender).
        client = self.client if self.client is not None else PoolWeightSyncClient(None, [])  # type: ignore[arg-type]
        t0 = time.perf_counter()

        def rendezvous() -> None:  # every rank; rank 0 joins the engines' NCCL group
            self.engine = trainer_init(init, client=client, source=self.source)

        everyone(acc, rendezvous)  # a failed rendezvous stops every rank before any gather starts
        if main:
            log.info("weights: NCCL group open (trainer rank 0 + %d engine worker(s) at %s:%d, %.2fs)",
                     world - 1, host, self.options.port, time.perf_counter() - t0)

    def _regroup_if_restarted(self) -> None:
        """Every rank: an engine restarted since the group formed (it is stale, outside the group): close the
        group on every side; :meth:`_open` forms it again with every engine of now."""
        pool = self.pool
        stale = on_main(self.accelerator, lambda: pool.run(_stale_engines))
        if not stale:
            return
        if self.accelerator.is_main_process:
            log.info("weights: NCCL group re-formed (%s restarted since it formed)", ", ".join(stale))
            pool.run(_close_group)
        self.close()

    def send(self, model: Any, version: int) -> SyncRecord | None:
        self.source.model = model
        if self.engine is not None:
            self._regroup_if_restarted()
        if self.engine is None:
            self._open()
        acc, pool, timeout = self.accelerator, self.pool, self.timeout_s
        t0 = time.perf_counter()
        with contextlib.ExitStack() as stack:

            def pause() -> None:
                if acc.is_main_process:
                    stack.enter_context(held_update(pool, version, abort=self.abort_inflight))

            everyone(acc, pause)  # a pool that cannot pause stops every rank before the gather starts
            send_weights(self.engine, self.source, acc, self.collectives)  # every rank gathers; rank 0 broadcasts
            if not acc.is_main_process:
                return None
            require_ok(pool.run(lambda p: p.engine_rpc("/reset_prefix_cache", timeout_s=timeout)))
        pool.run(_rejoin)  # stale engines the broadcast reached: checked, back in rotation
        total = time.perf_counter() - t0
        gather = min(self.source.gather_s, total)
        return SyncRecord(version, write_s=0.0, load_s=total - gather, gather_s=gather, ranks=acc.num_processes,
                          sharding=sharding(acc), transport="nccl")

    def close(self) -> None:
        if self.engine is not None:
            self.engine.shutdown()
            self.engine = None
