"""Geometry: warping, scaling and squaring, Jacobian determinants and folding."""
