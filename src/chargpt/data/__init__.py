"""The text: corpus files and the built-in plays, the character tokenizer, streaming tokenization, the token cache."""
