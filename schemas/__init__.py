"""Toto schemas."""
