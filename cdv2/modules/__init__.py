"""Flax Linen modules: math only (no file IO, no sharding, no globals, no mode state)."""
