"""Prism prefill service."""
