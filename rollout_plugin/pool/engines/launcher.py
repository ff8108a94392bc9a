"""Launching vLLM's OpenAI-compatible server as a child process, and attaching to running ones.

Each engine runs in its own session (process group) so it never sees the terminal's Ctrl-C and can
be stopped as a whole (vLLM forks an engine-core process); the kernel sends it SIGTERM if the
launching thread dies (PR_SET_PDEATHSIG), and an atexit hook stops whatever is still alive. No
engine outlives its owner: not on exit, not on Ctrl-C, not when a test fails.
"""

from __future__ import annotations

import asyncio
import atexit
import ctypes
import logging
import os
import secrets
import signal
import socket
import subprocess
import sys
import threading
import time
import weakref
from dataclasses import dataclass
from pathlib import Path

import httpx

from rollout_plugin.config.schema import EngineConfig
from rollout_plugin.errors import EngineError, EngineStartError
from rollout_plugin.pool.engines.placement import DEDICATED_UTILIZATION

log = logging.getLogger(__name__)

_LIVE: weakref.WeakSet[EngineProcess] = weakref.WeakSet()


@dataclass(frozen=True)
class EngineEndpoint:
    """Where an engine answers: what the HTTP client needs, launched or attached."""

    name: str
    url: str
    api_key: str | None
    pid: int | None = None


def _set_pdeathsig() -> None:  # runs in the child between fork and exec
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except OSError:
        pass


def reserve_ports(host: str, first: int, count: int) -> list[int]:
    """``count`` ports: ``first + i`` checked free, or OS-chosen free ones when ``first`` is 0."""
    socks: list[socket.socket] = []
    try:
        for i in range(count):
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            socks.append(sock)
            port = first + i if first else 0
            try:
                sock.bind((host, port))
            except OSError as exc:
                raise EngineError(f"engine.port={first}: port {port} on {host} is in use ({exc.strerror}); "
                                  f"use engine.port=0 to pick free ports") from None
        return [s.getsockname()[1] for s in socks]
    finally:
        for sock in socks:  # held together until all are picked, so two engines never share one
            sock.close()


def cpu_binding(index: int, engines: int, cores: list[int]) -> str | None:
    """Split the cores we may use evenly between engines (VLLM_CPU_OMP_THREADS_BIND syntax)."""
    if engines <= 1 or not cores:
        return None
    if engines >= len(cores):
        return str(cores[index % len(cores)])
    per = len(cores) // engines
    mine = cores[index * per:(index + 1) * per]
    return ",".join(str(c) for c in mine)


def server_command(cfg: EngineConfig, *, model: str, python: str, port: int, api_key: str,
                   max_num_seqs: int) -> list[str]:
    cmd = [
        python, "-m", "vllm.entrypoints.openai.api_server",
        "--model", model,
        "--host", cfg.host,
        "--port", str(port),
        f"--api-key={api_key}",
        "--dtype", cfg.dtype,
        "--max-model-len", str(cfg.max_model_len),
        "--gpu-memory-utilization", str(cfg.gpu_memory_utilization or DEDICATED_UTILIZATION),
        "--max-num-seqs", str(cfg.max_num_seqs or max_num_seqs),
        "--tensor-parallel-size", str(cfg.tensor_parallel_size),
        "--enable-prefix-caching" if cfg.enable_prefix_caching else "--no-enable-prefix-caching",
    ]
    if cfg.served_model_name:
        cmd += ["--served-model-name", cfg.served_model_name]
    if cfg.max_num_batched_tokens:
        cmd += ["--max-num-batched-tokens", str(cfg.max_num_batched_tokens)]
    return cmd + [str(a) for a in cfg.extra_args]


class EngineProcess:
    """One vLLM server child process. Start with :meth:`start`, then ``await wait_ready()``; always :meth:`stop`."""

    def __init__(self, index: int, cfg: EngineConfig, *, model: str, port: int, max_num_seqs: int,
                 cpu_bind: str | None, log_dir: Path, devices: tuple[str, ...] | None = None):
        self.index = index
        self.name = f"engine{index}"
        self.cfg = cfg
        self.port = port
        self.api_key = cfg.api_key or secrets.token_hex(24)  # hex: a key starting with "-" reads as a flag
        self.python = cfg.python or sys.executable
        self.command = server_command(cfg, model=model, python=self.python, port=port, api_key=self.api_key,
                                      max_num_seqs=max_num_seqs)
        self.cpu_bind = cpu_bind
        # Its own GPUs (pool.placement); None leaves CUDA_VISIBLE_DEVICES as inherited (CPU engines, or a
        # Ray actor, whose visibility Ray set).
        self.devices = devices
        self.log_path = log_dir / f"{self.name}-port{port}.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.started_at = 0.0

    @property
    def url(self) -> str:
        return f"http://{self.cfg.host}:{self.port}"

    def endpoint(self) -> EngineEndpoint:
        return EngineEndpoint(self.name, self.url, self.api_key, self.proc.pid if self.proc else None)

    def start(self) -> None:
        env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": str(self.cfg.cpu_kvcache_gb), **self.cfg.env}
        if self.cpu_bind is not None and self.cfg.cpu_bind == "auto":
            env.setdefault("VLLM_CPU_OMP_THREADS_BIND", self.cpu_bind)
        if self.cfg.dev_mode:
            env["VLLM_SERVER_DEV_MODE"] = "1"
        if self.devices is not None:
            env["CUDA_VISIBLE_DEVICES"] = ",".join(self.devices)
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "wb") as log_file:
            self.proc = subprocess.Popen(
                self.command, stdin=subprocess.DEVNULL, stdout=log_file, stderr=subprocess.STDOUT, env=env,
                start_new_session=True, preexec_fn=_set_pdeathsig,
            )
        self.started_at = time.monotonic()
        _LIVE.add(self)
        log.info("%s: stopped -> starting (pid=%d port=%d cores=%s CUDA_VISIBLE_DEVICES=%s log=%s)", self.name,
                 self.proc.pid, self.port, self.cpu_bind or "all", env.get("CUDA_VISIBLE_DEVICES", "unset"),
                 self.log_path)

    def log_tail(self, lines: int = 30) -> str:
        try:
            with open(self.log_path, "rb") as f:
                f.seek(max(0, os.path.getsize(self.log_path) - 16384))
                return b"\n".join(f.read().splitlines()[-lines:]).decode("utf-8", "replace")
        except OSError:
            return ""

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    async def wait_ready(self, timeout_s: float | None = None) -> float:
        """Poll ``/health`` until 200; raise :class:`EngineStartError` (with the log's tail) on exit or timeout."""
        timeout_s = timeout_s or self.cfg.startup_timeout_s
        deadline = self.started_at + timeout_s
        async with httpx.AsyncClient(timeout=2.0) as http:
            while True:
                if not self.alive():
                    code = self.proc.returncode if self.proc else None
                    raise EngineStartError(f"{self.name} exited with code {code} while starting "
                                           f"(log: {self.log_path})", self.log_tail())
                try:
                    if (await http.get(f"{self.url}/health")).status_code == 200:
                        ready = time.monotonic() - self.started_at
                        log.info("%s: starting -> ready (%.1fs, %s)", self.name, ready, self.url)
                        return ready
                except httpx.HTTPError:
                    pass
                if time.monotonic() > deadline:
                    raise EngineStartError(f"{self.name} not healthy after {timeout_s:.0f}s "
                                           f"(engine.startup_timeout_s; log: {self.log_path})", self.log_tail())
                await asyncio.sleep(0.5)  # polling an external process; nothing to wait on instead

    def stop(self, grace_s: float = 15.0) -> None:
        """SIGTERM the whole process group, SIGKILL what is left after ``grace_s``."""
        proc, self.proc = self.proc, None
        _LIVE.discard(self)
        if proc is None:
            return
        pgid = proc.pid  # start_new_session: the child leads its own group
        for sig, wait_s in ((signal.SIGTERM, grace_s), (signal.SIGKILL, 5.0)):
            try:
                os.killpg(pgid, sig)
                os.killpg(pgid, signal.SIGCONT)  # a stopped (hung) engine handles SIGTERM only once resumed
            except ProcessLookupError:
                break
            try:
                proc.wait(timeout=wait_s)
                # The leader is gone; its group may still hold children (vLLM's engine core).
                os.killpg(pgid, 0)
            except ProcessLookupError:
                break
            except subprocess.TimeoutExpired:
                continue
        log.info("%s: running -> stopped (pid=%d)", self.name, pgid)


def stop_all(processes: list[EngineProcess]) -> None:
    """Stop every engine at once: closing takes the slowest engine's grace period, not their sum."""
    def stop(proc: EngineProcess) -> None:
        try:
            proc.stop()
        except Exception:  # keep stopping the others; the failure is logged
            log.exception("%s: failed to stop", proc.name)

    live = [p for p in processes if p.proc is not None]
    if len(live) <= 1:
        for proc in live:
            stop(proc)
        return
    threads = [threading.Thread(target=stop, args=(p,), name=f"stop-{p.name}") for p in live]
    for t in threads:
        t.start()
    for t in threads:
        t.join()


@atexit.register
def _stop_leftovers() -> None:
    stop_all(list(_LIVE))


def engine_cores() -> list[int]:
    try:
        return sorted(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return list(range(os.cpu_count() or 1))
