"""Event contract, Faust attribution worker and dataset replay."""
