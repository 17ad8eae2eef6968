"""experiments/default_sweep.py on the tiny config: a run stopped by SIGTERM, judged, resumed."""

import importlib.util
import json
import os

import numpy as np
import pytest

from experiments import default_sweep
from trainer_harness import make_data
from trainer_harness import tiny_config


def _flatten(tree, prefix=''):
  flat = {}
  for key, value in tree.items():
    if isinstance(value, dict):
      flat.update(_flatten(value, f'{prefix}{key}.'))
    else:
      flat[f'{prefix}{key}'] = value
  return flat


@pytest.fixture
def tiny_variants(tmp_path, monkeypatch):
  config = tiny_config(make_data(str(tmp_path / 'data')))
  config.sampling.sampler = 'respaced'
  overrides = _flatten(config.to_dict())
  variants = {
    'today': default_sweep.Variant('the tiny config', overrides),
    'ddim': default_sweep.Variant(
      'the tiny config, DDIM', {**overrides, 'sampling.sampler': 'ddim'}, 'today'
    ),
  }
  monkeypatch.setattr(default_sweep, 'VARIANTS', variants)
  return config


def test_sweep_trains_for_its_budget_judges_and_resumes(tiny_variants, tmp_path):
  out = str(tmp_path / 'sweep')
  args = dict(
    out=out,
    names=['today', 'ddim'],
    budget_minutes=0.25,
    num_samples=8,
    resamples=3,
    curve_minutes=[],
    checkpoint_every=5,
  )
  results = default_sweep.run(**args)

  trained = json.load(open(os.path.join(out, 'today', 'trained.json')))
  checkpoints = sorted(
    int(p) for p in os.listdir(os.path.join(out, 'today', 'train', 'checkpoints'))
  )
  # SIGTERM came after the budget, and the trainer committed the step it had reached.
  assert trained['seconds'] >= 15
  assert trained['steps'] == checkpoints[-1] > 0
  times, steps = np.array(trained['log']).T
  assert (np.diff(times) >= 0).all() and (np.diff(steps) > 0).all()
  assert set(steps) <= set(checkpoints)  # A checkpoint at every logged step.

  rows = results['variants']
  assert rows['today']['steps'] == rows['ddim']['steps'] == trained['steps']
  for row in rows.values():
    final = row['final']
    assert np.isfinite(final['fd']) and final['fd'] > 0 and final['fd_spread'] >= 0
    assert final['num_samples'] == 8 and final['step'] == trained['steps']
    assert abs(sum(final['class_shares']) - 1) < 1e-3
    assert 0 <= final['confident_fraction'] <= 1
  # The same model and x_T: the two samplers still give different samples.
  assert rows['today']['final']['fd'] != rows['ddim']['final']['fd']
  assert [r['num_samples'] for r in results['real']] == [8]
  assert np.isfinite(results['real'][0]['fd'])
  for name in ('results.json', 'table.md', 'time_to_quality.png'):
    assert os.path.getsize(os.path.join(out, name)) > 0
  assert '| ddim | the tiny config, DDIM | ' in open(os.path.join(out, 'table.md')).read()

  # The written config file rebuilds the variant the judge used.
  spec = importlib.util.spec_from_file_location('variant', os.path.join(out, 'today', 'config.py'))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  assert module.get_config().to_dict() == default_sweep.variant_config('today').to_dict()

  # A rerun trains nothing again and gives the same numbers; asked for a curve, it judges the
  # newest checkpoint logged by then, here the first logged step.
  stamp = os.stat(os.path.join(out, 'today', 'trained.json')).st_mtime_ns
  minute = (trained['log'][0][0] + 0.01) / 60
  again = default_sweep.run(**{**args, 'names': ['today'], 'curve_minutes': [minute]})
  assert os.stat(os.path.join(out, 'today', 'trained.json')).st_mtime_ns == stamp
  row = again['variants']['today']
  assert row['final'] == json.loads(json.dumps(rows['today']['final']))
  curve = row['curve']
  assert [p['minutes'] for p in curve] == [minute, pytest.approx(trained['seconds'] / 60)]
  assert curve[0]['step'] == trained['log'][0][1] and curve[-1] == {
    'minutes': curve[-1]['minutes'],
    **row['final'],
  }
