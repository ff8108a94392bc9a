"""Bookkeeping, no I/O: the ledger and its queue, engine slots and their lifecycle, affinity, continuation, cuts,
and the engine-client interface every transport implements (the pool's port: verdicts, generations, progress)."""
