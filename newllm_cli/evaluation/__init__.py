"""What the contexts are worth: analysis, decodability probes, count baselines and verdicts."""
