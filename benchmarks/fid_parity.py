"""The parity figures of docs/fid.md: ddpm-jax's Inception FID against the wheel's TorchScript.

    scripts/setup.sh --peers   # torch, the reference's runtime
    python benchmarks/fid_parity.py [--json FILE.json]

Runs the image sets of tests/test_fid.py through both sides (ddpm_jax.metrics.fid, and
`default_1.pt` under torch.jit.load with the same resize and scaling), and reports what the
test bounds: per set the maximal feature error relative to the largest feature, per pair the
FID difference, here with `scipy.linalg.sqrtm` on both sides as the protocol computes it (the
test uses an exact low-rank form, which is faster), and how far each classic mistake moves
the features. Prints the JSON, and writes it to --json when given.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import time
import warnings

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, 'tests'))

from ddpm_jax import runtime  # noqa: E402

runtime.configure_xla_flags()

from ddpm_jax import files  # noqa: E402
from ddpm_jax.metrics import fid  # noqa: E402
from ddpm_jax.metrics import frechet  # noqa: E402
import test_fid as sets_lib  # noqa: E402  pylint: disable=g-import-not-at-top


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--json', default=None, help='where to write the figures')
  args = parser.parse_args(argv)
  extractor = fid.inception_extractor(batch_size=sets_lib.BATCH)
  features, sets = {}, {}
  for name, images in sets_lib._sets().items():
    ours = fid.compute_features(images, extractor)
    reference = sets_lib._torch_features(images)
    features[name] = (ours, reference)
    sets[name] = dict(
      shape=list(images.shape), max_relative_error=sets_lib._relative_error(ours, reference)
    )
    print(name, sets[name], flush=True)
  pairs = []
  for a, b in sets_lib.PAIRS:
    start = time.perf_counter()
    with warnings.catch_warnings():
      warnings.simplefilter('ignore')  # fewer images than dimensions: singular covariances
      ours = frechet.frechet_distance_from_features(features[a][0], features[b][0])
      reference = frechet.frechet_distance_from_features(features[a][1], features[b][1])
    pairs.append(
      dict(
        a=a,
        b=b,
        fid_reference=reference,
        fid_ours=ours,
        abs_difference=abs(ours - reference),
        seconds_for_both=round(time.perf_counter() - start, 1),
      )
    )
    print(pairs[-1], flush=True)
  mistakes = {}
  for mistake, (name, kwargs) in sets_lib.MISTAKES.items():
    images = sets_lib._sets()[name]
    wrong = sets_lib._torch_features(images, **kwargs)
    mistakes[mistake] = dict(
      set=name, max_relative_change=sets_lib._relative_error(features[name][0], wrong)
    )
    print(mistake, mistakes[mistake], flush=True)
  summary = dict(
    date=datetime.date.today().isoformat(),
    reference=f'{fid.WHEEL} {fid.WHEEL_FILE} under torch.jit.load',
    feature_error='max |ours - reference| / max |reference| over the set',
    sets=sets,
    pairs=pairs,
    mistakes=mistakes,
  )
  if args.json:
    files.write_json(args.json, summary)
  print(json.dumps(summary, indent=2))
  return 0


if __name__ == '__main__':
  sys.exit(main())
