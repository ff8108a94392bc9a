"""verl config groups (``+rollout_pool=tuned|pool|long_context`` on verl's command line); YAML only."""
