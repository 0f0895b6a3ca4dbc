"""Package data: signatures.json.gz (component key sets; see tools/gen_signatures.py)."""
