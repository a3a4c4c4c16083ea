"""sspctl trainers package."""
