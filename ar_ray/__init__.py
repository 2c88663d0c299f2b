"""ar-ray: the Attract-and-Repulse recipe (VIPriors 2021, 2nd place) tuned and ensembled on Ray."""

__version__ = "0.1.0"
