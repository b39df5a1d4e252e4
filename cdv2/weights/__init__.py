"""Checkpoint formats: torch <-> Flax key maps and layouts, cdv2 weight directories."""
