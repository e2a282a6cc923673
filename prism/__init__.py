"""Prism: disaggregated serving for large multimodal models."""
