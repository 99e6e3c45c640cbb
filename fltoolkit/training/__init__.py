"""Local training of a round's clients: the cohort plan, the trainer, kept optimizer state, and
the updates clients send."""
