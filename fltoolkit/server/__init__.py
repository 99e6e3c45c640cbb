"""The server's side of a round: where its tables live, applying a strategy, and evaluating the
global model."""
