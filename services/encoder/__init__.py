"""Prism encoder service."""
