"""chainfree: training without paying the full price of backprop.

Drop-in entry points:
    chainfree.sus_attention(q, k, v, c=32)      # in place of F.scaled_dot_product_attention
    chainfree.methods.basis.apply(model, rank=32)
"""

__version__ = "0.1.0"
