"""Hydra plugins shipped with rollout-plugin (``hydra_plugins`` is a namespace package Hydra scans)."""
