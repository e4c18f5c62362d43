"""Examples of marginops on real and synthetic data (run them with ``python -m examples.<name>``)."""
