"""cladapt.serve: inference-time adapter selection and serving.

Serving reads only the registry (never ``cladapt.train``): it applies registry versions to the
base model through :mod:`cladapt.adapters.loading` — one version, or the composed sum of every
active sum-composed version. Per-request routers and the HTTP server are built on that seam.
"""
