"""The analyses of the paper's three findings (Zhang et al., arXiv 2502.00840, section 4).

- :mod:`quada.analysis.sweep`: safety degrades before utility; the most vulnerable approximation.
- :mod:`quada.analysis.layers`: which layers matter; the choice of tau.
- :mod:`quada.analysis.clusters`: harmful and benign activations, and their drift.
"""
