"""The real work of ftpipe, as plain Python: no Dagster import anywhere below this package."""
