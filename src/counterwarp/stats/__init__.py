"""Statistics and scoring: arrays in, numbers or arrays out."""
