"""Tasks: what a cell is trained to do, with its head, loss and metrics."""
