"""Training, evaluation and inference."""
