"""morphnas."""
