"""Toto pipeline."""
