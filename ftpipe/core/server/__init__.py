"""`python -m ftpipe serve`: every task's champion behind one OpenAI-compatible API (`app`), decoded in batches
with an adapter per row (`engine`) from the registry's models (`catalog`), every request logged (`request_log`)."""
