"""Test utilities shipped with the package: tiny random-weight checkpoints (see ``tiny_models``)."""
