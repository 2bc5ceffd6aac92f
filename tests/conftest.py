import os

# torch_npu, if somehow installed, must not be auto-loaded by `import torch` in tests.
os.environ.setdefault("TORCH_DEVICE_BACKEND_AUTOLOAD", "0")
