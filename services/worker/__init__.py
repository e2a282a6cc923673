"""A worker process hosting several stages (colocation)."""
