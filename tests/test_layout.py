"""The layout's rules (DESIGN.md), checked on the source: data flows one way, one source per fact."""

import ast
import pathlib

import pytest

REPO = pathlib.Path(__file__).resolve().parent.parent


def _imports(path: pathlib.Path) -> set[str]:
  """Every module a file imports, as dotted names (`from a import b` gives a and a.b)."""
  names = set()
  for node in ast.walk(ast.parse(path.read_text())):
    if isinstance(node, ast.Import):
      names.update(alias.name for alias in node.names)
    elif isinstance(node, ast.ImportFrom) and node.module:
      names.add(node.module)
      names.update(f'{node.module}.{alias.name}' for alias in node.names)
  return names


def _sources(package: str):
  return sorted((REPO / package).rglob('*.py'))


def _importers(package: str, module: str) -> list[str]:
  return [str(p.relative_to(REPO)) for p in _sources(package)
          if any(n == module or n.startswith(module + '.') for n in _imports(p))]


def test_the_dataset_package_needs_nothing_from_mura_jax():
  assert _importers('tfds_mura', 'mura_jax') == []


def test_the_input_pipeline_does_not_depend_on_the_models():
  assert not [n for n in _imports(REPO / 'mura_jax' / 'input_pipeline.py')
              if n.startswith('mura_jax.models')]


def test_only_main_imports_train():
  # Evaluation, inference, CAM, predict and export read checkpoints, never the training code.
  assert _importers('mura_jax', 'mura_jax.train') == ['mura_jax/main.py']


@pytest.mark.parametrize('name', ['BODY_PARTS', 'IMAGENET_MEAN', 'RESIZE_MODES'])
def test_each_fact_is_defined_once(name):
  definitions = []
  for path in _sources('mura_jax') + _sources('tfds_mura'):
    for node in ast.walk(ast.parse(path.read_text())):
      if isinstance(node, ast.Assign) and any(
          isinstance(t, ast.Name) and t.id == name for t in node.targets):
        definitions.append(str(path.relative_to(REPO)))
  assert len(definitions) == 1, definitions


def test_configs_are_importable_from_the_package():
  # The embedded default lives inside the package (any install has it); configs/ files build on
  # mura_jax.configs and never put their own folder on sys.path.
  assert (REPO / 'mura_jax' / 'configs' / 'demo.py').exists()
  for path in (REPO / 'configs').glob('*.py'):
    text = path.read_text()
    assert 'sys.path' not in text and 'import common' not in text, path
