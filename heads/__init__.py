"""Trainable heads over cached frozen-encoder features (registry filled in by stage_one)."""
