"""YAML backfills of the Paceline code location: one folder per component, each with its defs.yaml."""
