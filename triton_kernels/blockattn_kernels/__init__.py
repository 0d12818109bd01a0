"""Triton kernels for paged block attention (installed as ``blockattn_kernels``)."""
