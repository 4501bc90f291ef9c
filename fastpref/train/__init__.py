"""The fastpref trainer (DESIGN §5)."""
