"""Workflows: one module per command, run folder in, run folder out."""
