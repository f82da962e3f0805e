"""Evaluation harnesses and their committed results (not an installed package; run as ``python -m evals.model``)."""
