"""Anywhere: a self-hosted reverse tunnel for Linux."""

from .common import __version__

__all__ = ["__version__"]
