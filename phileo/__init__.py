"""Shared core of PhilEO-MajorTOM at scale: bands, geo maths and the shard schema.

Nothing here does I/O beyond bytes in, arrays out; `sharding` and `training` both
depend on this package and never on each other.
"""

__version__ = "0.1.0"
