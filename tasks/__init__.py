"""Prefect tasks: one per pipeline stage. Each depends on the service Protocols only."""
