"""EOSS library code: data, models, losses, curvature measurements, run folders."""
