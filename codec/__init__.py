"""aligncodec.codec."""
