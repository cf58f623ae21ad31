"""Toto trainer."""
