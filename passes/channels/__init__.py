"""Structured channel pruning: coupling analysis, importance, prune, shrink, compact."""
