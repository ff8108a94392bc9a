"""The `collect` job: JSONL prompts -> scored rollouts, through the pool."""

from rollout_plugin.collect.dataset import Example, load_examples
from rollout_plugin.collect.job import CollectSummary, collect
from rollout_plugin.collect.output import RolloutWriter

__all__ = ["CollectSummary", "Example", "RolloutWriter", "collect", "load_examples"]
