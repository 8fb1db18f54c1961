"""Fixtures: filled by their issue."""
