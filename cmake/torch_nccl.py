"""For cmake/FindNCCL.cmake: prints "<torch's NCCL version>;<nvidia-nccl package dir>" of this Python.

The version (e.g. 2.28.9) is the NCCL the installed torch runs (empty without torch or without
NCCL in torch); the directory is that of the nvidia-nccl-cu13 package (include/, lib/), which a
PyPI torch loads, empty when absent. Needs no GPU.
"""
nccl_dir = ""
try:
    import nvidia.nccl

    nccl_dir = list(nvidia.nccl.__path__)[0]
except Exception:
    pass
version = ""
try:
    import warnings

    warnings.simplefilter("ignore")
    import torch

    v = torch.cuda.nccl.version()
    if isinstance(v, int):  # older torch: NCCL_VERSION_CODE
        v = (v // 10000, v // 100 % 100, v % 100)
    version = ".".join(str(part) for part in v[:3])
except Exception:
    pass
print(f"{version};{nccl_dir}")
