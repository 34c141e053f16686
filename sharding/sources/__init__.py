"""Source readers: list the rows of a source (catalog) and turn one row into a phileo Sample."""
