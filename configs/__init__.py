"""SoraFlow configs."""
