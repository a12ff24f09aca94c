"""The Ray and DeepSpeed versions a cluster runs: one place, read by the runtime_env builder and checked against
every manifest in clusters/ by the tests, so a job never installs a different Ray over its image's."""

RAY_VERSION = "2.60.0"
DEEPSPEED_VERSION = "0.19.8"
PYTHON_TAG = "py311"
RAY_IMAGE = f"rayproject/ray:{RAY_VERSION}-{PYTHON_TAG}-gpu"
"""The image of every KubeRay pod and of the cluster launcher's nodes (CUDA, Ray pinned)."""
