"""Trainer adapters (verl, TRL). Each imports its trainer lazily, so the core stays light."""
