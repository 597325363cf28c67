"""verl glue: everything that touches verl's registries, trainer, workers and agent loops lives here."""
