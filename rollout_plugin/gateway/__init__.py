"""One OpenAI-compatible endpoint in front of the pool (``rollout-plugin serve``).

Importing this package does not import FastAPI or uvicorn; :func:`serve` does, when it runs.
"""

from rollout_plugin.gateway.batching import merge_completions, split_prompts
from rollout_plugin.gateway.native import NativeCompletion, completion_response, plan_completion
from rollout_plugin.gateway.relay import Exchange, PassThroughClient, Relay, StreamCut
from rollout_plugin.gateway.server import ServeConfig, serve, validate_serve

__all__ = ["Exchange", "NativeCompletion", "PassThroughClient", "Relay", "ServeConfig", "StreamCut",
           "completion_response", "merge_completions", "plan_completion", "serve", "split_prompts",
           "validate_serve"]
