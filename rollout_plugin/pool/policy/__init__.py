"""Pure decisions, no I/O, no clock reads: routing, the cap controller, packing, limits, rate limits, stragglers."""
