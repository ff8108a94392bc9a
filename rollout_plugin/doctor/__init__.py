"""``rollout-plugin doctor``: a run's summary and timeline (or live /metrics) in, what to change out."""

from rollout_plugin.doctor.findings import EngineFacts, Finding, RunFacts, diagnose, live_facts, run_facts

__all__ = ["EngineFacts", "Finding", "RunFacts", "diagnose", "live_facts", "run_facts"]
