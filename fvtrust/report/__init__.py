"""Reproduce the paper on the embedded default and write an HTML report."""
from .reproduce import reproduce

__all__ = ["reproduce"]
