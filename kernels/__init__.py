"""zoft.kernels: Triton kernels for the CUDA path, each beside its pure-torch reference.

Packaged under the import name ``zoft.kernels`` (setuptools ``package-dir``), never as a
top-level ``kernels``: that name belongs to the Hugging Face ``kernels`` package, which
bitsandbytes tries to import. The fused perturbation/update kernels land with the
fast-perturbations work; the CPU path uses ``zoft.noise`` directly.
"""
