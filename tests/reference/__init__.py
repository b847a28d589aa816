"""The float64 reference implementation (the oracle of the parity tests)."""
