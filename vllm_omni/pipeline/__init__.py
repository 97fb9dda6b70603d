"""Omni pipelines: the stage manager, stage kinds, stage processes and launchers, hand-offs, stage I/O."""
