"""aligncodec.tools."""
