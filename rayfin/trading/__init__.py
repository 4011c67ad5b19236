"""Scoring, decisions, risk, simulated execution and the ledger (planned)."""
