"""Cluster jobs: `lookahead-ray submit` and `lookahead-ray jobs` on Ray's Job Submission SDK (``submit``),
the runtime_env they send (``runtime_env``) and the pinned versions the manifests in clusters/ use."""
