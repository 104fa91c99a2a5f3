"""Placeholder: being written."""


class ServerSlots:
    """Placeholder."""
