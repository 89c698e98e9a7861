"""The run around the algorithm: ``trainer`` (the stage loop) and what it writes and reads —
``checkpoint`` (atomic save/resume), ``folders`` (a run folder as the other commands read it),
``outputs`` (metrics, samples, grids, plots), ``scoring`` (decode + reward overlapped with
sampling), ``stage_table`` (a stage's rewards gathered from every rank in batch order)."""
