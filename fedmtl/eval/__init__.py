"""Evaluation: the metrics of a client's held-out split and their summaries, the comparison
of runs, and the figures of a run."""
