"""One walker module per container; sdtool.scan.containers routes blobs to them."""
