"""Datasets and reward functions the TRL recipes name by dotted path.

Reward functions follow TRL's signature ``fn(prompts, completions, completion_ids, **columns) -> list[float]``.
"""

from __future__ import annotations

import json
from importlib import resources
from typing import Any

from rollout_plugin.verify.builtin import last_number_match


def _content(completion: Any) -> str:
    if isinstance(completion, list):  # conversational: [{"role": "assistant", "content": ...}]
        return "".join(str(m.get("content") or "") for m in completion)
    return str(completion)


def arith_dataset(limit: int | None = None, chat: bool = True):
    """The arithmetic prompts shipped in the package as a ``datasets.Dataset`` (``prompt``, ``answer``)."""
    from datasets import Dataset

    rows = []
    with resources.files("rollout_plugin.data").joinpath("arith.jsonl").open() as f:
        for line in f:
            row = json.loads(line)
            prompt = [{"role": "user", "content": row["prompt"]}] if chat else row["prompt"]
            rows.append({"prompt": prompt, "answer": str(row["answer"])})
    return Dataset.from_list(rows[:limit] if limit else rows)


def gsm8k_dataset(split: str = "train", limit: int | None = None):
    """GSM8K (``openai/gsm8k``, config ``main``) as chat prompts with the final number as ``answer``."""
    from datasets import load_dataset

    data = load_dataset("openai/gsm8k", "main", split=split)
    if limit:
        data = data.select(range(min(limit, len(data))))

    def to_row(row: dict[str, Any]) -> dict[str, Any]:
        question = row["question"] + "\nThink step by step, then give the final answer as a number on the last line."
        return {"prompt": [{"role": "user", "content": question}],
                "answer": row["answer"].split("####")[-1].strip().replace(",", "")}

    return data.map(to_row, remove_columns=data.column_names)


def correctness_reward(prompts, completions, answer, **kwargs) -> list[float]:
    """1.0 when the completion's last number equals the row's ``answer`` (GSM8K, arithmetic)."""
    return [last_number_match(_content(c), {"answer": a}) for c, a in zip(completions, answer)]


class TokenReward:
    """Favours one token: the share of the completion's tokens equal to ``token_id`` (0..1).

    The tiny random model starts near uniform over its vocabulary, so this reward starts near 0 and
    rising is an unambiguous sign that the policy learns from the pool's rollouts."""

    def __init__(self, token_id: int = 17):
        self.token_id = int(token_id)
        self.__name__ = f"token_{self.token_id}_share"  # TRL logs rewards under the function's name

    def __call__(self, prompts, completions, completion_ids, **kwargs) -> list[float]:
        return [sum(t == self.token_id for t in ids) / max(len(ids), 1) for ids in completion_ids]


def token_reward(token_id: int = 17) -> TokenReward:
    return TokenReward(token_id)
