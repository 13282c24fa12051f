"""Dataset replay: real or synthetic interactions → a seeded ad layer → events on Kafka."""
