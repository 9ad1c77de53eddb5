"""Small shipped data; provenance in PROVENANCE.md."""
