"""Text in, token arrays out: sources, tokenizers, dataset building and validation duplicates."""
