"""A griffe extension for the API reference: show Sphinx roles as inline code.

The docstrings name other members the Sphinx way (``:meth:`stats```), which
Markdown would print as is; this turns each role into plain inline code.
"""

from __future__ import annotations

import re
from typing import Any

import griffe

_ROLE = re.compile(r":(?:py:)?(?:meth|class|func|attr|exc|mod|data|obj|const):`~?([^`]+)`")


class SphinxRolesAsCode(griffe.Extension):
    """Rewrite ``:role:`name``` in every docstring as ``name`` in backticks."""

    def on_instance(self, *, obj: griffe.Object, **kwargs: Any) -> None:
        """Rewrite the docstring of each object as it is loaded."""
        if obj.docstring is not None:
            obj.docstring.value = _ROLE.sub(r"`\1`", obj.docstring.value)
