"""Detector plugins: each scores every document of a suspect dataset (higher = more suspicious)."""
