"""CLI command modules, one per pipeline stage."""
