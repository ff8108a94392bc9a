"""Fleet simulator: simulated engines under the real pool, on simulated time.

``rollout-plugin simulate`` answers "what would this policy do on 1,024 engines with stragglers
and failures" in seconds: :mod:`.engine` models continuous batching, :mod:`.client` puts it behind
the engine-client interface, :mod:`.loop` runs asyncio on a virtual clock, so the real dispatcher,
controller and monitor run unmodified. :mod:`.profile` / :mod:`.calibrate` fit the step-time model
to measured (CPU) or published (H100) figures and state its error.
"""

from rollout_plugin.sim.config import Policy, SimulateConfig
from rollout_plugin.sim.engine import SimEngine
from rollout_plugin.sim.loop import VirtualTimeLoop, VirtualTimeRunner, run_virtual
from rollout_plugin.sim.profile import EngineProfile, StepModel, load_profile
from rollout_plugin.sim.runner import RunResult, simulate

__all__ = ["EngineProfile", "Policy", "RunResult", "SimEngine", "SimulateConfig", "StepModel", "VirtualTimeLoop",
           "VirtualTimeRunner", "load_profile", "run_virtual", "simulate"]
