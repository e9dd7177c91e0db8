"""The one exception users see from `lightning_soup`."""


class SoupError(ValueError):
    """Inputs that cannot be merged, blended or stored: incompatible state dicts, bad arguments, bad files.

    A subclass of :class:`ValueError`, so existing ``except ValueError`` handlers keep working. The message names
    the offending argument, key or file and says what to do.
    """
