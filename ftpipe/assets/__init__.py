"""Thin Dagster wiring around ftpipe.core, one module per asset group."""
