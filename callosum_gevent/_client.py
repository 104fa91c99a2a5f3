"""Placeholder: being written."""


class CallosumClient:
    """Placeholder."""
