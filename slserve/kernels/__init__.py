"""Kernels: paged attention and batched mixed-rank LoRA, each as a torch implementation (CPUs, and
the reference), C++ CPU loops (cpu_ext.py) and Triton kernels (GPUs). slserve/backends.py picks
one set per model runner."""
