"""DNAL channel learning: channel gates, the three stages, and physical pruning of real networks."""
