"""Test kits and device scripts, kept out of the installed package: the CUDA backend's reference
cases (``cuda_cases``), the kernel cases and benchmark (``kernel_cases``, ``kernel_bench``), the GPU
check run on a lent GPU machine (``gpu_check``) and the sm_90 compile check (``compile_check``).
Run them from the repository root, e.g. ``python -m tools.gpu_check --quick --json gpu_check.json``."""
