"""What the pool shows: vLLM /metrics parsed, the timeline, the pool's own Prometheus metrics, stats snapshots."""
