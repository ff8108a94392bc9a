"""Pictures of a run: the pool's timeline as a PNG (matplotlib is imported only when drawing)."""

from rollout_plugin.viz.timeline_plot import MATPLOTLIB_REQUIREMENT, describe, load_timeline, plot_timeline

__all__ = ["MATPLOTLIB_REQUIREMENT", "describe", "load_timeline", "plot_timeline"]
