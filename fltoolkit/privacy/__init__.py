"""Privacy mechanisms, each in its module: client-local embedding tables that never leave the
client (local_tables), client-level differential privacy (dp, with the accountant in
accountant), simulated secure aggregation (secure_sum, secure_aggregation), the `privacy`
section (config) and a run's assembly of them (plan). Nothing is imported here, so that
`fltk privacy` imports neither torch nor Lightning."""
