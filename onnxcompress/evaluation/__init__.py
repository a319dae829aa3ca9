"""Scoring compressed models: metrics (built in and the user's own); sensitivity and accuracy control build on them."""
