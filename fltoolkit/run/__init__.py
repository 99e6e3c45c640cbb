"""A run: the command line, the experiment's configuration, fitting, checkpoints and resuming,
and the processes (ranks) that share it."""
