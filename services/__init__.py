"""Prism services: one package per inference stage plus the scheduler."""
