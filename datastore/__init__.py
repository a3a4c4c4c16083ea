"""sspctl datastore package."""
