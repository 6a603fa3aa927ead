"""Reproducible experiments on built-in data (scikit-learn's bundled digits)."""
