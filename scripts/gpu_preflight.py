#!/usr/bin/env python3
"""python scripts/gpu_preflight.py — what a first GPU run depends on, checked with torch alone (< 3 minutes).

A lent GPU box has torch but cannot carry vLLM's GPU wheel, so nothing here needs vLLM (or this package: where
rollout_plugin imports, its own placement and timeout are used as well). One line per check:

  torch          torch's version, CUDA, the GPUs it sees;
  nccl-dup-gpu   two processes on cuda:0 in one NCCL group, one all_reduce, 60 s limit: what vLLM's NCCL weight
                 transfer meets when an engine shares trainer rank 0's GPU (why nccl + engine.colocate is refused);
  placement      nvidia-smi's list (what the pool reads) against torch's: plain, under CUDA_VISIBLE_DEVICES=<last
                 index>, and by UUID (each in a child process, as an engine gets its GPU);
  memory-*       a trainer stand-in (resident training state of a 0.5B model) on cuda:0, then vLLM's startup rule
                 (free memory >= utilization x total) at 0.9 and the colocated fractions, with and without the NCCL
                 transfer's 2 x 1 GiB receive buffers;
  pg-timeout     the process-group timeout torch gives a group made without one, and the one make_pool sets.

Without CUDA it says so and exits 0. Exits 1 if a check failed (a finding: see the line).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from datetime import timedelta

GIB = 1 << 30
TRAINER_PARAMS = 494_000_000  # Qwen2.5-0.5B: the smoke test's model
TRAINER_BYTES = 16 * TRAINER_PARAMS  # fp32 params + grads + two Adam moments, unsharded (one rank)
NCCL_BUFFERS = 2 * GIB  # vLLM's packed transfer: 2 receive buffers of 1 GiB per worker
FRACTIONS = (0.9, 0.5, 0.3)  # dedicated (vLLM's default), then colocated shares
DUP_TIMEOUT_S = 60

failed = 0


def line(status: str, name: str, detail: str) -> None:
    global failed
    failed += status == "FAIL"
    print(f"{status} {name:<13} {detail}", flush=True)


def _dup_worker(rank: int, port: int) -> None:  # a child: one rank of the duplicate-GPU group
    import torch
    import torch.distributed as dist

    torch.cuda.set_device(0)
    dist.init_process_group("nccl", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2,
                            timeout=timedelta(seconds=DUP_TIMEOUT_S))
    x = torch.ones(1, device="cuda:0")
    dist.all_reduce(x)
    torch.cuda.synchronize()
    print(json.dumps({"rank": rank, "sum": x.item()}), flush=True)
    dist.destroy_process_group()


def check_duplicate_gpu() -> None:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    code = f"import sys; sys.path.insert(0, {os.path.dirname(__file__)!r}); import gpu_preflight as g; " \
           f"g._dup_worker(int(sys.argv[1]), {port})"
    procs = [subprocess.Popen([sys.executable, "-c", code, str(r)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True) for r in range(2)]
    t0, outs = time.monotonic(), []
    for p in procs:
        try:
            outs.append(p.communicate(timeout=max(1.0, DUP_TIMEOUT_S + 10 - (time.monotonic() - t0))))
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            line("FAIL", "nccl-dup-gpu", f"two ranks on cuda:0 hung for {DUP_TIMEOUT_S}s in init/all_reduce: an "
                 "engine on trainer rank 0's GPU would hang the NCCL weight transfer (refused: nccl + colocate)")
            return
    if all(p.returncode == 0 for p in procs):
        line("WARN", "nccl-dup-gpu", "NCCL accepted two ranks on cuda:0 here (this NCCL build allows it); the "
             "refusal of weights.transport=nccl with engine.colocate=true stays: vLLM's group is not tested so")
        return
    err = next((e for _, e in outs if "rror" in e), outs[0][1] if outs else "")
    cause = next((ln.strip() for ln in err.splitlines() if "uplicate" in ln or "NCCL" in ln), err.strip()[-200:])
    line("PASS", "nccl-dup-gpu", f"NCCL refuses two ranks on one GPU ({cause[:200]}): so does our config check")


def _smi(*args: str) -> list[list[str]]:
    out = subprocess.run(["nvidia-smi", *args, "--format=csv,noheader,nounits"], capture_output=True, text=True,
                         timeout=30, check=True).stdout
    return [[c.strip() for c in row.split(",")] for row in out.splitlines() if row.strip()]


def _child_sees(env_value: str) -> list[str]:
    code = ("import torch, json; print(json.dumps([str(torch.cuda.get_device_properties(i).uuid) "
            "for i in range(torch.cuda.device_count())]))")
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": env_value}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env)
    return json.loads(out.stdout.strip().splitlines()[-1]) if out.returncode == 0 and out.stdout.strip() else []


def check_placement(torch) -> None:
    if shutil.which("nvidia-smi") is None:
        line("FAIL", "placement", "no nvidia-smi: the pool cannot list GPUs to place engines on")
        return
    rows = _smi("--query-gpu=index,uuid,memory.total")
    torch_uuids = [str(torch.cuda.get_device_properties(i).uuid) for i in range(torch.cuda.device_count())]
    smi_uuids = [r[1].removeprefix("GPU-") for r in rows]
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    try:
        from rollout_plugin.pool.engines.placement import gpu_inventory

        inv = gpu_inventory()
        ours = f"; the pool's inventory: {list(inv.devices)} from {inv.source}, smallest {inv.memory_gib} GiB"
    except Exception as exc:  # a box with torch only
        ours = f"; rollout_plugin not importable here ({type(exc).__name__})"
    same = visible is not None or [u.removeprefix("GPU-") for u in torch_uuids] == smi_uuids
    line("PASS" if same else "FAIL", "placement", f"nvidia-smi lists {len(rows)} GPU(s), torch sees "
         f"{len(torch_uuids)}{' (CUDA_VISIBLE_DEVICES=' + visible + ')' if visible is not None else ''}{ours}")
    last = rows[-1]
    by_index, by_uuid = _child_sees(last[0]), _child_sees(last[1])
    want = last[1].removeprefix("GPU-")
    ok = [u.removeprefix("GPU-") for u in by_index] == [want] and [u.removeprefix("GPU-") for u in by_uuid] == [want]
    line("PASS" if ok else "FAIL", "placement-env", f"CUDA_VISIBLE_DEVICES={last[0]} -> {by_index}; "
         f"={last[1]} -> {by_uuid} (want exactly GPU {last[0]}, {last[1]})")


def check_memory(torch) -> None:
    free0, total = torch.cuda.mem_get_info(0)
    stand_in = torch.empty(TRAINER_BYTES, dtype=torch.uint8, device="cuda:0")  # the trainer's resident state
    free, _ = torch.cuda.mem_get_info(0)
    line("INFO", "memory", f"cuda:0 {total / GIB:.1f} GiB, {free0 / GIB:.1f} free; trainer stand-in "
         f"{TRAINER_BYTES / GIB:.1f} GiB (0.5B params x 16 B) -> {free / GIB:.1f} GiB free")
    # vLLM refuses to start when free memory < utilization x total: an engine at 0.9 beside a trainer cannot.
    beside = 0.9 * total <= free
    line("INFO", "memory-0.9-tr", f"vLLM at 0.9 on the trainer's GPU asks {0.9 * total / GIB:.1f} GiB: "
         + ("fits" if beside else "does not fit (why engines stay off the training ranks' GPUs unless colocated)"))
    outside = (1 - 0.9) * total
    room = outside >= NCCL_BUFFERS + GIB
    line("PASS" if room else "FAIL", "memory-0.9", f"a dedicated engine at 0.9 leaves {outside / GIB:.1f} GiB outside "
         f"vLLM's budget: {'room' if room else 'too little'} for the NCCL buffers (2 GiB) + 1 GiB"
         + ("" if room else "; weights.transport=nccl lowers engine.gpu_memory_utilization for this"))
    for util in FRACTIONS[1:]:
        fits = util * total <= free
        line("PASS" if fits else "FAIL", f"memory-{util}", f"a colocated engine at {util} asks {util * total / GIB:.1f}"
             f" GiB beside the trainer stand-in: {'fits' if fits else 'does not fit'} (colocated engines take "
             "weights by folder or IPC, never NCCL)")
    del stand_in
    torch.cuda.empty_cache()


def check_timeout() -> None:
    from torch.distributed import constants

    default = constants.default_pg_timeout
    try:
        from rollout_plugin.adapters.trl.ranks import job_timeout_s

        ours = f"make_pool sets {job_timeout_s():.0f}s (engine start / drain on rank 0 alone + margin)"
    except Exception as exc:
        ours = f"make_pool not importable here ({type(exc).__name__}); it sets >= 1800s (TRL's ddp_timeout)"
    status = "PASS" if default.total_seconds() >= 1800 else "INFO"
    line(status, "pg-timeout", f"torch's default {default.total_seconds():.0f}s for a group made without one; {ours}")


def main() -> int:
    try:
        import torch
    except ImportError:
        print("SKIP torch         not installed: nothing to check")
        return 0
    if not torch.cuda.is_available():
        print(f"SKIP cuda          no CUDA here (torch {torch.__version__}): the GPU checks need a GPU box")
        return 0
    t0 = time.monotonic()
    names = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    line("PASS", "torch", f"torch {torch.__version__}, CUDA {torch.version.cuda}, {len(names)} GPU(s): "
         f"{', '.join(dict.fromkeys(names))}")
    for check in (lambda: check_duplicate_gpu(), lambda: check_placement(torch), lambda: check_memory(torch),
                  check_timeout):
        try:
            check()
        except Exception as exc:  # one broken check does not hide the others
            line("FAIL", "error", f"{type(exc).__name__}: {exc}")
    print(f"gpu_preflight: {failed} failed in {time.monotonic() - t0:.0f}s")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
