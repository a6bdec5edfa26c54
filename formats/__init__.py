"""aligncodec.formats."""
