"""The Attract-and-Repulse recipe in plain PyTorch: no Ray here, so it runs and tests alone."""
