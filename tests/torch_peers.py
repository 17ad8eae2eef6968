"""Imports the PyTorch peers that some tests compare against.

torchvision 0.28.0 from PyPI is built against CUDA torch, so next to the CPU
build of torch 2.13.0 its C++ operator library does not load. torchvision
copes with that, except that two fake-tensor registrations (for the
detection ops nms and qnms) then refer to operators that were never
declared, and the import fails. Declaring those two operator schemas (public
signatures, no kernels) lets the pure-Python model code import; no test
calls them. diffusers imports torchvision whenever it is installed, so every
test that imports diffusers or pytorch-fid goes through `import_torchvision`
first.
"""

import sys

import torch

_LIBRARIES = []  # The declared schemas live as long as their Library object.


def import_torchvision():
  """Returns the torchvision module, declaring the missing schemas if needed."""
  try:
    import torchvision  # pylint: disable=g-import-not-at-top
  except RuntimeError as e:
    if 'torchvision::nms' not in str(e):
      raise
    for name in [m for m in sys.modules if m == 'torchvision' or m.startswith('torchvision.')]:
      del sys.modules[name]
    lib = torch.library.Library('torchvision', 'FRAGMENT')
    lib.define('nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor')
    lib.define('qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor')
    _LIBRARIES.append(lib)
    import torchvision  # pylint: disable=g-import-not-at-top
  return torchvision
