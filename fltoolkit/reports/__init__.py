"""Run directories, their records, plots and reports (see each module)."""
