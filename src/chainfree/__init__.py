"""chainfree: training without paying the full price of backprop.

Drop-in entry points:
    chainfree.sus_attention(q, k, v, c=32)      # in place of F.scaled_dot_product_attention
    chainfree.methods.basis.apply(model, rank=32)
    chainfree.apply(model, "sus", c=32)         # prepare any model (transformers included) for your own trainer
    chainfree.remove(model)                     # undo apply: the original attention and layers come back
"""

__version__ = "0.1.0"


def __getattr__(name: str):
    """Lazy top-level exports, so `import chainfree` stays light (no op modules loaded until used)."""
    if name == "sus_attention":
        from chainfree.ops.sus import sus_attention

        return sus_attention
    if name == "apply":  # the submodule, callable as chainfree.apply(model, method, **config)
        import chainfree.apply as module

        return module
    if name == "remove":
        from chainfree.apply import remove

        return remove
    raise AttributeError(f"module 'chainfree' has no attribute {name!r}")
