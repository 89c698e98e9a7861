"""Alignment evaluation: ``evaluator`` samples prompt sets with fixed seeds and scores them
(used by the trainer's before/after table); ``cli`` is ``python -m b2fast.eval``."""
