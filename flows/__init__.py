"""SoraFlow flows."""
