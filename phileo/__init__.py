"""Shared core of PhilEO-MajorTOM at scale: bands, geo maths, the shard schema and its tar reader,
the models, and the remote-I/O policy both stages follow.

Nothing here touches a file system or network by itself (bytes in, arrays out; remote.py only
classifies errors and makes the S3 client); `sharding` and `training` both depend on this
package and never on each other.
"""

__version__ = "0.1.0"
