"""The Ray-free training core: the loop (trainer.py), the engine's numerics and precision (engine.py),
the batch plan, records, checkpoints and the schedule it uses; cluster/ launches it under Ray Train."""
