"""One OpenAI-compatible endpoint in front of the pool (``rollout-plugin serve``).

Importing this package does not import FastAPI or uvicorn; :func:`serve` does, when it runs.
"""

from rollout_plugin.gateway.batching import merge_completions, split_prompts
from rollout_plugin.gateway.relay import PassThroughClient, Relay
from rollout_plugin.gateway.server import ServeConfig, serve, validate_serve

__all__ = ["PassThroughClient", "Relay", "ServeConfig", "merge_completions", "serve", "split_prompts",
           "validate_serve"]
