"""Using a trained model: the one-token decode step, sampling, scoring, int8 weights, export."""
