"""The Ray, DeepSpeed and torch versions a cluster runs: one place, read by the runtime_env builder and checked
against every manifest in clusters/ by the tests, so a job never installs a different Ray over its image's and
every node runs the same torch.

torch is pinned because an unpinned requirement lets each job (and each node's pip cache) resolve its own build.
The torch wheel carries its own CUDA runtime, and nothing in training is compiled on the nodes (the optimizer
is torch's fused AdamW, not DeepSpeed's JIT-built FusedAdam), so the image's CUDA toolkit is not used; its
driver must be new enough for that runtime. Optimizer offload (``train.offload_optimizer``) is the exception:
DeepSpeedCPUAdam is a C++ op built with the node's compiler on first use, or once into the image with
``DS_BUILD_CPU_ADAM=1 pip install deepspeed==DEEPSPEED_VERSION``."""

RAY_VERSION = "2.60.0"
DEEPSPEED_VERSION = "0.19.8"
TORCH_VERSION = "2.13.0"
PYTHON_TAG = "py311"
RAY_IMAGE = f"rayproject/ray:{RAY_VERSION}-{PYTHON_TAG}-gpu"
"""The image of every KubeRay pod and of the cluster launcher's nodes (CUDA, Ray pinned)."""
