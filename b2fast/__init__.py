"""b2fast: fast, tested B²-DiffuRL (RL fine-tuning of text-to-image diffusion models with LoRA).

``import b2fast`` is cheap and never fails for lack of the compiled extension, Triton or a GPU;
heavy modules (torch, diffusers) load when first used.
"""
__version__ = "0.1.0"


def backends() -> dict[str, str]:
    """Which backend serves each op, and why the others are not live (see :mod:`b2fast.ops`)."""
    from b2fast.ops import backends as _backends
    return _backends()
