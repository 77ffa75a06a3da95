"""Using a trained run: evaluate it on other text, load it from Python, export it."""
