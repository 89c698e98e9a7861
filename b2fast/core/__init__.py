"""B²-DiffuRL itself, readable top-down:

``schedule`` (DDIM step table, interval schedule) → ``policy`` (the UNet + LoRA as a policy:
ε-prediction with CFG, decoding; ``cuda_graphs`` its captured step) → ``sampling`` (trunk →
fork → branches, the trajectory batch) → ``selection`` (reward history, z-scores, best/worst
branch per group) → ``objectives`` (the losses, by ``train.objective``) → ``update`` (one
stage's optimisation: accumulation, clipping, AdamW).

Imports only downward: ``b2fast.ops`` (the fused elementwise ops), ``config``, ``utils``,
``distributed``, and the prompt data and test fixtures (``policy`` maps the ``b2fast:toy``-style
model names to their folders). Nothing here knows about runs, files or rewards.
"""
