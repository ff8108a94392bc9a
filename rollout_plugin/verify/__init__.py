"""Verifiers (reward functions): concurrent execution beside generation, a result cache, deferred mode."""

from rollout_plugin.verify.builtin import last_number, last_number_match
from rollout_plugin.verify.cache import VerifyCache
from rollout_plugin.verify.job import VerifyJobConfig, VerifyJobSummary, verify_file
from rollout_plugin.verify.runner import VerifierRunner, VerifyStats, load_verifier

__all__ = ["VerifierRunner", "VerifyCache", "VerifyJobConfig", "VerifyJobSummary", "VerifyStats", "last_number",
           "last_number_match", "load_verifier", "verify_file"]
