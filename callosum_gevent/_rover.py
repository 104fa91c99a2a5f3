"""Placeholder: being written."""


class Rover:
    """Placeholder."""
