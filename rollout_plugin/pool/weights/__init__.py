"""Weight updates: the one update sequence (with compensation), weight sources, identity checks, refit."""
