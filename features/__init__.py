"""User token sequences (the one token builder) and Feast feature-store access."""
