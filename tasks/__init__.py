"""SoraFlow tasks."""
