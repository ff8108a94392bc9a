"""Back-of-envelope memory model: weights, KV cache, engine reserve, training state and activations.

Deliberately simple and conservative: the planner uses these figures to pick settings that start
and do not preempt, not to predict the last gigabyte. Every figure is in bytes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from rollout_plugin.tuning.spec import GIB, HardwareSpec, ModelSpec

# CUDA context, CUDA graphs, NCCL buffers, allocator slack: what vLLM holds beyond weights and KV.
ENGINE_FIXED_RESERVE_GPU = 2.0 * GIB
ENGINE_FIXED_RESERVE_TP = 0.5 * GIB  # extra per GPU when TP > 1 (NCCL/custom all-reduce buffers)
ENGINE_FIXED_RESERVE_CPU = 1.0 * GIB
# FSDP with fp32 master weights and AdamW: params 4 + grads 4 + two moments 8 bytes per parameter.
TRAIN_STATE_BYTES_PER_PARAM = 16
TRAIN_MARGIN = 4.0 * GIB  # fragmentation, NCCL, the allocator cache
# vLLM's packed NCCL weight transfer (vllm/distributed/weight_transfer/packed_tensor.py
# DEFAULT_PACKED_BUFFER_SIZE_BYTES / DEFAULT_PACKED_NUM_BUFFERS): each worker receives into this many buffers.
NCCL_BUFFER_BYTES = 1 * GIB
NCCL_NUM_BUFFERS = 2
# Outside vLLM's budget besides the update: the CUDA context of a second process touching the GPU, allocator slack.
UPDATE_MARGIN = 1.0 * GIB


def kv_bytes_per_token(model: ModelSpec, tp: int = 1) -> int:
    """KV cache bytes one token takes on one GPU: 2 (K and V) × layers × kv_heads × head_dim × dtype bytes.

    With TP the KV heads are split; when TP exceeds the KV head count vLLM replicates them, so a GPU
    never holds less than one head per layer.
    """
    heads_per_gpu = max(1, model.num_kv_heads // tp)
    return 2 * model.num_layers * heads_per_gpu * model.head_dim * model.dtype_bytes


def weight_bytes(model: ModelSpec) -> int:
    return model.num_params * model.dtype_bytes


def engine_reserve_bytes(model: ModelSpec, hardware: HardwareSpec, *, tp: int, max_num_batched_tokens: int,
                         max_num_seqs: int) -> int:
    """Per-GPU memory an engine needs besides weights and KV cache.

    vLLM profiles a forward pass of ``max_num_batched_tokens`` tokens before sizing the KV cache: its
    peak is the gated MLP's intermediate (split by TP) plus a few hidden-sized buffers; the sampler
    holds fp32 logits over the full vocabulary for every running sequence.
    """
    if hardware.kind == "cpu":
        fixed = ENGINE_FIXED_RESERVE_CPU
    else:
        fixed = ENGINE_FIXED_RESERVE_GPU + (ENGINE_FIXED_RESERVE_TP if tp > 1 else 0)
    activations = max_num_batched_tokens * (2 * model.intermediate_size // tp + 4 * model.hidden_size)
    activations *= model.dtype_bytes
    logits = max_num_seqs * model.vocab_size * 4
    return int(fixed + activations + logits)


def nccl_update_bytes(model: ModelSpec | None, *, tp: int = 1, buffer_bytes: int = NCCL_BUFFER_BYTES,
                      num_buffers: int = NCCL_NUM_BUFFERS) -> int:
    """Per-GPU memory an engine worker takes *outside* vLLM's ``gpu_memory_utilization`` during an NCCL update.

    The packed transfer's receive buffers (``num_buffers`` × ``buffer_bytes``, allocated by
    ``packed_nccl_broadcast_consumer``) plus what layer-wise reload materialises: the largest layer, or the
    embedding / LM head (vocab × hidden), split by TP. ``model`` None (a hub id, no config.json): buffers only.
    """
    layer = 0
    if model is not None:
        layer = max(weight_bytes(model) // max(1, model.num_layers),
                    model.vocab_size * model.hidden_size * model.dtype_bytes) // max(1, tp)
    return num_buffers * buffer_bytes + layer


def utilization_leaving(memory_gib: float, utilization: float, outside_bytes: int) -> float:
    """The largest of ``utilization`` and lower multiples of 0.05 that leaves ``outside_bytes`` plus
    :data:`UPDATE_MARGIN` of each GPU outside vLLM's budget (0.0: it cannot)."""
    free_share = 1 - (outside_bytes + UPDATE_MARGIN) / (memory_gib * GIB)
    return round(min(utilization, math.floor(free_share * 20 + 1e-9) / 20), 2) if free_share > 0 else 0.0


@dataclass(frozen=True)
class KVEstimate:
    """How much KV cache one engine (one TP group) gets, and how many full-length sequences that holds."""

    tp: int
    budget_per_gpu: int  # memory × utilization
    weights_per_gpu: int
    reserve_per_gpu: int
    kv_per_gpu: int  # what is left for the KV cache (may be negative: does not fit)
    bytes_per_token: int  # per GPU
    tokens: int  # KV tokens per engine
    seqs: int  # full-length (max_model_len) sequences per engine

    @property
    def fits(self) -> bool:
        return self.kv_per_gpu > 0


def kv_estimate(model: ModelSpec, hardware: HardwareSpec, *, tp: int, utilization: float, max_model_len: int,
                max_num_batched_tokens: int, max_num_seqs: int) -> KVEstimate:
    """KV budget = memory × utilization − weights ÷ TP − reserve, in tokens and full-length sequences."""
    budget = int(hardware.gpu_memory_gib * GIB * utilization)
    weights = -(-weight_bytes(model) // tp)
    reserve = engine_reserve_bytes(model, hardware, tp=tp, max_num_batched_tokens=max_num_batched_tokens,
                                   max_num_seqs=max_num_seqs)
    kv = budget - weights - reserve
    per_token = kv_bytes_per_token(model, tp)
    tokens = max(0, kv) // per_token
    return KVEstimate(tp=tp, budget_per_gpu=budget, weights_per_gpu=weights, reserve_per_gpu=reserve,
                      kv_per_gpu=kv, bytes_per_token=per_token, tokens=tokens, seqs=tokens // max_model_len)


def train_state_bytes_per_gpu(model: ModelSpec, world_size: int, *, offload: bool) -> int:
    """FSDP-sharded parameters, gradients and AdamW moments one training GPU keeps resident."""
    if offload:
        # Parameters and optimizer live on the CPU; a layer's worth of unsharded bf16 weights is resident.
        return 2 * model.num_params // max(1, model.num_layers)
    return TRAIN_STATE_BYTES_PER_PARAM * model.num_params // world_size


def train_bytes_per_token(model: ModelSpec, *, with_lm_head: bool = True) -> int:
    """Activation bytes one token costs in a training step with gradient checkpointing.

    Checkpointed: one hidden state per layer. Recomputed: one layer's activations. The fp32 logits
    over the vocabulary (value, log-softmax, gradient) dominate small models: that is why a critic,
    whose head is one scalar, fits a larger micro-batch than the actor.
    """
    checkpoints = model.num_layers * model.hidden_size * model.dtype_bytes
    one_layer = (16 * model.hidden_size + 3 * model.intermediate_size) * model.dtype_bytes
    logits = 3 * model.vocab_size * 4 if with_lm_head else 0
    return checkpoints + one_layer + logits


def train_token_budget(model: ModelSpec, hardware: HardwareSpec, world_size: int, *, offload: bool,
                       with_lm_head: bool = True, resident_models: int = 1) -> int:
    """Tokens of activations one training GPU can hold after its sharded state and a margin.

    ``resident_models``: 2 when a critic of the same size shares the GPUs with the actor.
    """
    state = resident_models * train_state_bytes_per_gpu(model, world_size, offload=offload)
    free = hardware.gpu_memory_gib * GIB - state
    free -= TRAIN_MARGIN
    return max(0, int(free)) // train_bytes_per_token(model, with_lm_head=with_lm_head)


def forward_bytes_per_token(model: ModelSpec, *, with_lm_head: bool = True) -> int:
    """Activation bytes one token costs in a forward-only pass (ref / old log-probs, critic values).

    Nothing is kept for a backward: one layer's activations at a time, and at the head the bf16 logits,
    their fp32 copy and the log-softmax over the vocabulary (a critic's head is one scalar).
    """
    one_layer = (16 * model.hidden_size + 3 * model.intermediate_size) * model.dtype_bytes
    logits = model.vocab_size * (model.dtype_bytes + 4 + 4) if with_lm_head else 0
    return one_layer + logits


def forward_token_budget(model: ModelSpec, hardware: HardwareSpec, world_size: int, *, offload: bool,
                         with_lm_head: bool = True, resident_models: int = 1) -> int:
    """Tokens one training GPU can push through a forward-only pass next to everything resident then.

    Resident: the sharded training state (``resident_models`` of them: actor, and a critic under GAE) and
    the reference policy's sharded bf16 weights (offloaded with ``offload``), plus the same margin as training.
    """
    state = resident_models * train_state_bytes_per_gpu(model, world_size, offload=offload)
    reference = 0 if offload else weight_bytes(model) // max(1, world_size)
    free = hardware.gpu_memory_gib * GIB - state - reference - TRAIN_MARGIN
    return max(0, int(free)) // forward_bytes_per_token(model, with_lm_head=with_lm_head)

