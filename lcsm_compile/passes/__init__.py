"""Graph passes, one per file; the backend runs them in the order of `PIPELINE`."""
