"""Prism scheduler service."""
