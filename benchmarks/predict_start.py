"""`mura-predict` on one study, from the command to the printed table, against a torchvision
script doing the same: what a reading-room workstation without a GPU waits for.

    python benchmarks/predict_start.py --workdir WORKDIR STUDY_FOLDER [--rounds 3]
        [--torch-weights FILE.pth] [--cam]

WORKDIR holds a trained checkpoint (any model; the figures in BENCHMARKS.md are densenet169's).
Every run is a fresh process. The first mura-predict run uses an empty compilation cache (cold);
the next ones reuse it (warm): the compiled network and its traced programs. With
--torch-weights (a torchvision densenet169 state dict; random weights give the same time:
    python -c "import torch, torchvision; torch.save(torchvision.models.densenet169().state_dict(),
               '/tmp/densenet169.pth')")
each round also times what a torchvision MURA reimplementation's predict script does: import
torch, build densenet169 with one output, load the file, read the study's PNGs with PIL (RGB,
resize 224, normalise), one forward pass, the mean probability. Runs alternate, round by round.
"""

import argparse
import glob
import json
import os
import subprocess
import sys
import tempfile
import time


def torch_predict(weights: str, study: str) -> float:
  """The torchvision side, in this process (run as `--torch-side`)."""
  import torch  # pylint: disable=g-import-not-at-top
  import torchvision  # pylint: disable=g-import-not-at-top
  from PIL import Image  # pylint: disable=g-import-not-at-top
  from torchvision import transforms  # pylint: disable=g-import-not-at-top
  torch.set_num_threads(os.cpu_count() or 1)
  model = torchvision.models.densenet169()
  model.classifier = torch.nn.Linear(model.classifier.in_features, 1)
  state = torch.load(weights)
  state['classifier.weight'] = state['classifier.weight'][:1]
  state['classifier.bias'] = state['classifier.bias'][:1]
  model.load_state_dict(state)
  model.eval()
  transform = transforms.Compose([
      transforms.Resize((224, 224)), transforms.ToTensor(),
      transforms.Normalize([0.485, 0.456, 0.406], [0.229, 0.224, 0.225])])
  files = sorted(f for f in glob.glob(os.path.join(study, '*.png'))
                 if not os.path.basename(f).startswith('._'))
  x = torch.stack([transform(Image.open(f).convert('RGB')) for f in files])
  with torch.no_grad():
    return float(torch.sigmoid(model(x))[:, 0].mean())


def timed(command) -> float:
  start = time.time()
  done = subprocess.run(command, capture_output=True, text=True, check=False)
  seconds = time.time() - start
  if done.returncode != 0:
    raise RuntimeError(f'{" ".join(command)} exited {done.returncode}:\n{done.stderr[-2000:]}')
  return seconds


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  parser.add_argument('study', help='a study folder (PNG views)')
  parser.add_argument('--workdir', required=True)
  parser.add_argument('--rounds', type=int, default=3)
  parser.add_argument('--torch-weights', help='a torchvision densenet169 .pth (see above)')
  parser.add_argument('--cam', action='store_true', help='mura-predict --cam (overlays too)')
  parser.add_argument('--json', help='write the figures here too')
  parser.add_argument('--torch-side', action='store_true', help=argparse.SUPPRESS)
  args = parser.parse_args()
  if args.torch_side:
    print(torch_predict(args.torch_weights, args.study))
    return
  load = os.getloadavg()[0]
  with tempfile.TemporaryDirectory() as scratch:
    predict = [sys.executable, '-m', 'mura_jax.serving.predict', '--workdir', args.workdir,
               '--compilation-cache', os.path.join(scratch, 'cache'), args.study]
    if args.cam:
      predict += ['--cam', '--out', os.path.join(scratch, 'out')]
    torch_side = [sys.executable, __file__, '--torch-side', '--workdir', args.workdir,
                  '--torch-weights', str(args.torch_weights), args.study]
    rows = [{'run': 'cold (empty cache)', 'mura_predict_s': timed(predict)}]
    for r in range(args.rounds):
      row = {'run': f'warm, round {r + 1}', 'mura_predict_s': timed(predict)}
      if args.torch_weights:
        row['torchvision_s'] = timed(torch_side)
      rows.append(row)
  print(f'load {load:.1f} -> {os.getloadavg()[0]:.1f}; {os.cpu_count()} CPUs')
  print(f'{"run":<20} {"mura-predict s":>15} {"torchvision s":>14}')
  for row in rows:
    theirs = f'{row["torchvision_s"]:.2f}' if 'torchvision_s' in row else '-'
    print(f'{row["run"]:<20} {row["mura_predict_s"]:>15.2f} {theirs:>14}')
  if args.json:
    with open(args.json, 'w') as f:
      json.dump({'study': args.study, 'cam': args.cam, 'rows': rows}, f, indent=1)


if __name__ == '__main__':
  main()
