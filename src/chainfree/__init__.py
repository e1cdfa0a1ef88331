"""chainfree: training without paying the full price of backprop.

Drop-in entry points:
    chainfree.sus_attention(q, k, v, c=32)      # in place of F.scaled_dot_product_attention
    chainfree.methods.basis.apply(model, rank=32)
"""

__version__ = "0.1.0"


def __getattr__(name: str):
    """Lazy top-level exports, so `import chainfree` stays light (no op modules loaded until used)."""
    if name == "sus_attention":
        from chainfree.ops.sus import sus_attention

        return sus_attention
    raise AttributeError(f"module 'chainfree' has no attribute {name!r}")
