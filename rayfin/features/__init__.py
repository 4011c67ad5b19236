"""Per-symbol window features, one definition for live actors and Ray Data (planned)."""
