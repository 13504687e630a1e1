"""Dataset formats: validation, versioning, label maps and the generated demo datasets."""
