"""Preference annotation: people compare two responses, and their labels feed `rlhf reward` and `rlhf dpo`.

Commands live in :mod:`rlhf.annotate.cli`. This package imports nothing heavy at import time
(Flask and SQLAlchemy load only when a command needs them), so `rlhf --help` stays fast.
"""

# The environment variable that may hold the cookie-signing key (for servers that share one without sharing a file).
# Here so that the CLI names it without loading the store.
KEY_ENV = "RLHF_ANNOTATE_SECRET_KEY"
