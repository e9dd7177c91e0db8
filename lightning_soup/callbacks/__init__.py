"""Callback implementations, shared by both Lightning flavours (bound in ``lightning_soup._pl`` and
``lightning_soup.lightning``). Nothing here imports Lightning."""
