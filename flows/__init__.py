"""Prefect flows: they only sequence tasks (pipeline, retrain, promote, reproduce)."""
