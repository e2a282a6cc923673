"""Offline profiling for deadline-driven modality selection (MOSEL-style): per-stage costs and
per-reduction accuracies of a model, measured through Prism's own engines (``prism profile``).

Import the submodules: ``schema`` (the profile file), ``cost``, ``accuracy``, ``profile``."""
