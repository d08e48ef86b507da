"""Measurement, with one home: the held-out evaluator (perplexity and exact-zero activation
counts in one pass), the x1 hooks it counts through, weight sparsity, ``prosparse sparsity``'s
per-source measurement and the FATReLU threshold sweep. Training, pruning, the sparsity
calibrations and evaluation all measure through here."""
