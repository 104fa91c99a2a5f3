"""Placeholder: being written."""


class CallosumServer:
    """Placeholder."""
