"""Training: the loop, optimiser and schedule, checkpoints, and plots of a run."""
