"""SoraFlow models."""
