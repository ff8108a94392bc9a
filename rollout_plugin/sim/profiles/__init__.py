"""Built-in engine profiles (JSON): ``cpu_tiny`` (measured here), ``h100_llama8b`` (published figures)."""
