"""sspctl orchestrator package."""
