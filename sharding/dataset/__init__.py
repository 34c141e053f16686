"""Tools over a built dataset: query, subset, split, coverage, verify, inspect."""
