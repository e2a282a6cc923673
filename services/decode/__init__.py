"""Prism decode service."""
