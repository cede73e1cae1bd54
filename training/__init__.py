"""Training: load real data, fit calibrated candidates, pick the best, save it to the store."""
