"""`python -m producer URLS_FILE`."""

from .cli import entry

entry()
