"""Ray actors: long-lived processes that own state (stream consumers, later block servers)."""
