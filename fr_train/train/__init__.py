"""The Ray-free training core: the engine's numerics (engine.py); the trainer moves here with the
structure issue (DESIGN.md, "What a run is")."""
