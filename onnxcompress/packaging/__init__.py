"""Deployment packages: one folder carrying a compressed model to production (`onnxcompress package`).

`manifest.py` is the format and its verification, `build.py` writes a package, `predictor.py` loads and runs one.
"""
