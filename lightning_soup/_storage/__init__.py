"""Implementation of :mod:`lightning_soup.storage`; import the public names from there."""
