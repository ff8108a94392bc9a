"""Engine processes and their checks: the launcher, Ray, the provider seam, GPU placement, server checks, pre-warm."""
