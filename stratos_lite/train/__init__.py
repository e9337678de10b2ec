"""Training: the one builder of the training model (builder.py), the loop (trainer.py) and its loss
(loss.py), a run from a TrainConfig (run.py), where a run stands (run_state.py), checkpoints (checkpoint.py),
one process / DDP / FSDP (strategy.py, fsdp.py), the NaN guard (guard.py), preemption, the CPU heap,
the metrics log and the end-of-run summary.

Imports model/, data/, the settings and storage/; never planning/, evaluation/ or export/.
"""
