"""Declarative torch-key <-> Flax-path maps for the preprocessor networks."""
