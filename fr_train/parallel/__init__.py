"""Process-group plumbing shared by the sharded heads and the global-batch losses: the class-split
rule (sharding.py), the autograd-aware uneven all-gather and the small reductions (collectives.py),
and the global batch every sample-to-sample loss works on (global_batch.py)."""
