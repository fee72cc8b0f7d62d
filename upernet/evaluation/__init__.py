"""Evaluation: confusion matrices, mmsegmentation's metrics, and scoring a model on a split."""
