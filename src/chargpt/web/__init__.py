"""The page `chargpt export --format web` writes: index.html, the model in plain JavaScript."""
