"""The error a user can fix, raised by every layer and printed by the command line in one line.

A library function that refuses its input (a bad flag value, a folder that is not a model, an output that would
destroy something) raises :class:`InputError` with a message naming the input and the fix; ``odegpt``'s ``main``
prints ``odegpt COMMAND: message`` and exits 2, with no traceback. Real bugs raise what they raise.
"""
from __future__ import annotations


class InputError(ValueError):
    """Bad input the user can fix; the message names it (and, where there is one, the fix)."""
