"""Prefect flows: they only sequence tasks (pipeline, retrain, promote, reproduce)."""

from udaflow.environment import setup_environment

setup_environment()  # a worker imports the flows without the `udaflow` command: no telemetry there either
