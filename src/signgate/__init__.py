"""signgate: sign container images in CI, admit only signed images in Kubernetes.

Compatible with cosign's key files and signature layout in both directions.
"""

__version__ = "0.1.0"
