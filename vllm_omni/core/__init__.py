"""Pipeline orchestration above the stage engines: outputs, stages, hand-offs."""
