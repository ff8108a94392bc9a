"""Verifiers (reward functions) and their concurrent execution."""

from rollout_plugin.verify.builtin import last_number, last_number_match
from rollout_plugin.verify.runner import VerifierRunner, load_verifier

__all__ = ["VerifierRunner", "last_number", "last_number_match", "load_verifier"]
