"""Machinery shared by the post-training defenses: the repair config and context (``context``), training loops
(``loops``), the repair base class and its rendering (``repair``), data plumbing (``data``), output (``output``) and
figure helpers (``figures``). Nothing here imports a defense module, so every defense can import it without a cycle.
"""
