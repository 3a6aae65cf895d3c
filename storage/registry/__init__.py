"""The model registry: model folders and cards, the MLflow registry, pyfunc model and run tracking."""
