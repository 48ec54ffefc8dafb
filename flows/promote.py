"""Promotion flows: gate the challenger against the champion; roll the champion back."""

from __future__ import annotations

from prefect import flow

from tasks.registry import promotion_gate, rollback_champion
from udaflow.config import Config


@flow(name="udaflow-promote")
def promote_model(cfg: Config, model: str, dry_run: bool = False):
    return promotion_gate(cfg, model, dry_run)


@flow(name="udaflow-rollback")
def rollback_model(cfg: Config, model: str, dry_run: bool = False):
    return rollback_champion(cfg, model, dry_run)
