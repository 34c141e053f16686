"""Errors of the sharding stage, by layer (see the developers' guide)."""


class InputError(Exception):
    """Bad user input (path, flag, file): the CLI prints the one-line message and exits 2."""


class RowError(Exception):
    """One source row cannot be converted; it is rejected with this reason and the build goes on."""
