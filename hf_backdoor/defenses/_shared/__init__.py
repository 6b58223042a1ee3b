"""Machinery shared by the post-training defenses: the repair config and context (``context``), training loops
(``loops``), the repair base class and its rendering (``repair``), data plumbing (``data``), output (``output``),
figure helpers (``figures``), and token-id rows for the text defenses (``tokens``: batches, stripping, pooled features,
a linear probe). Nothing here imports a defense module, so every defense can import it without a cycle.
"""
