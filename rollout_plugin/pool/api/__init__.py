"""What users and trainer adapters call: the pool, its operations beside generation, step quotas, the blocking facade."""
