"""The layout's rules (docs/layout.md), checked on the source: a package per stage, data flows one
way, one door into a model, one home per fact, thin entry points."""

import ast
import pathlib
import re

import pytest

REPO = pathlib.Path(__file__).resolve().parent.parent
PACKAGES = ('mura_jax', 'tfds_mura')

# The jobs: what a mode or a command runs. A job never imports another job (what they share
# lives in a module of its own).
JOBS = ('mura_jax.training.train', 'mura_jax.evaluation.evaluate',
        'mura_jax.evaluation.scorer', 'mura_jax.interpretation.cam', 'mura_jax.serving.predict',
        'mura_jax.serving.export')
# Packages that may be imported inside a function: optional (an extra brings them) or heavy and
# needed by one branch only. Everything else is imported at the top, so the import lines show
# the real dependency graph.
OPTIONAL_IMPORTS = ('tensorflow', 'tensorflow_datasets', 'torch', 'torchvision', 'pydicom',
                    'gdcm', 'matplotlib', 'clu', 'keras', 'h5py', 'safetensors', 'tqdm',
                    'orbax', 'grain', 'array_record', 'PIL', 'jax.experimental.jax2tf',
                    'jax._src.lib.mlir', 'psutil', 'resource')


def _module_name(path: pathlib.Path) -> str:
  parts = list(path.relative_to(REPO).with_suffix('').parts)
  if parts[-1] == '__init__':
    parts.pop()
  return '.'.join(parts)


def _sources(package: str = ''):
  roots = [REPO / package] if package else [REPO / p for p in PACKAGES]
  return sorted(p for root in roots for p in root.rglob('*.py'))


def _imports(path: pathlib.Path, top_level_only: bool = False) -> set[str]:
  """Every module a file imports, as dotted names (`from a import b` gives a and a.b)."""
  tree = ast.parse(path.read_text())
  nodes = tree.body if top_level_only else ast.walk(tree)
  names = set()
  for node in nodes:
    if isinstance(node, ast.Import):
      names.update(alias.name for alias in node.names)
    elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
      names.add(node.module)
      names.update(f'{node.module}.{alias.name}' for alias in node.names)
  return names


MODULES = {_module_name(p): p for p in _sources()}


def _project_imports(path: pathlib.Path) -> set[str]:
  """The project's modules a file imports (packages' __init__ left out)."""
  return {n for n in _imports(path) if n in MODULES and not MODULES[n].name == '__init__.py'}


def _importers(package: str, module: str) -> list[str]:
  return [str(p.relative_to(REPO)) for p in _sources(package)
          if any(n == module or n.startswith(module + '.') for n in _imports(p))]


def test_no_import_cycle():
  graph = {name: _project_imports(path) - {name} for name, path in MODULES.items()}
  state, stack = {}, []

  def visit(name):
    state[name] = 'open'
    stack.append(name)
    for other in sorted(graph[name]):
      if state.get(other) == 'open':
        raise AssertionError('import cycle: ' + ' -> '.join(stack[stack.index(other):] + [other]))
      if other not in state:
        visit(other)
    stack.pop()
    state[name] = 'done'

  for name in sorted(graph):
    if name not in state:
      visit(name)


def test_the_dataset_package_needs_nothing_from_mura_jax():
  assert _importers('tfds_mura', 'mura_jax') == []


def test_the_data_package_does_not_depend_on_models_or_training():
  assert not [n for p in _sources('mura_jax/data') for n in _imports(p)
              if n.startswith(('mura_jax.models', 'mura_jax.training', 'mura_jax.inference'))]


def test_models_are_pure():
  # The network and its weights' ports: no runtime tuning, no data pipeline, no training.
  assert not [n for p in _sources('mura_jax/models') for n in _imports(p)
              if n.startswith(('mura_jax.runtime', 'mura_jax.training', 'mura_jax.data.input'))]


@pytest.mark.parametrize('package', ['mura_jax/evaluation', 'mura_jax/interpretation',
                                     'mura_jax/serving'])
def test_consumers_of_a_model_never_import_training(package):
  # They read checkpoints through the one door, mura_jax/inference.
  assert _importers(package, 'mura_jax.training') == []


def test_no_job_imports_another_job():
  found = {job: sorted(set(JOBS) & _project_imports(MODULES[job]) - {job}) for job in JOBS}
  assert {job: others for job, others in found.items() if others} == {}


def test_main_imports_only_the_runtime_and_the_cli_at_the_top():
  # main.py maps a mode to its job's module, imported when that mode runs.
  top = {n for n in _imports(REPO / 'mura_jax' / 'main.py', top_level_only=True)
         if n.startswith('mura_jax')}
  assert not {n for n in top if n.startswith(JOBS)}, top


def test_imports_are_at_the_top_except_optional_packages():
  inside = []
  for path in _sources():
    tree = ast.parse(path.read_text())
    top = set(id(n) for n in tree.body)
    for node in ast.walk(tree):
      if isinstance(node, (ast.Import, ast.ImportFrom)) and id(node) not in top:
        names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                 else [node.module or ''])
        inside += [f'{path.relative_to(REPO)}:{node.lineno} {n}' for n in names
                   if not n.startswith(OPTIONAL_IMPORTS) and not _is_lazy_job(path, n)
                   and not _is_guarded(tree, node)]
  assert inside == []


def _is_lazy_job(path: pathlib.Path, name: str) -> bool:
  """main.py imports a mode's job when that mode runs (`python -m mura_jax.main --help` and the
  modes that do not need TensorFlow's or grain's start-up stay fast)."""
  return path.name == 'main.py' and (name.startswith(JOBS) or name in (
      'mura_jax.data', 'mura_jax.training', 'mura_jax.evaluation', 'mura_jax.interpretation',
      'mura_jax.serving'))


def _is_guarded(tree, node) -> bool:
  """An import inside `try: ... except ImportError` (an optional package's probe)."""
  for handler_owner in ast.walk(tree):
    if isinstance(handler_owner, ast.Try) and node in list(ast.walk(handler_owner))[1:]:
      if any(isinstance(h.type, ast.Name) and h.type.id in ('ImportError',
                                                           'ModuleNotFoundError')
             for h in handler_owner.handlers):
        return True
  return False


MAX_LINES = 450


def test_no_module_is_longer_than_a_reader_can_hold():
  long = {str(p.relative_to(REPO)): n for p in _sources()
          if (n := len(p.read_text().splitlines())) > MAX_LINES}
  assert long == {}


def test_main_is_thin():
  assert len((REPO / 'mura_jax' / 'main.py').read_text().splitlines()) <= 100


def _definitions(name: str) -> list[str]:
  found = []
  for path in _sources():
    for node in ast.walk(ast.parse(path.read_text())):
      named = (isinstance(node, ast.Assign) and any(
          isinstance(t, ast.Name) and t.id == name for t in node.targets)) or (
              isinstance(node, (ast.FunctionDef, ast.ClassDef)) and node.name == name)
      if named:
        found.append(str(path.relative_to(REPO)))
  return found


# The facts with one home: MURA's names (tfds_mura/paths.py), the preprocessing's constants, one
# model factory, one bootstrap's draws, one study aggregation, one door into a model.
@pytest.mark.parametrize('name', [
    'BODY_PARTS', 'IMAGENET_MEAN', 'RESIZE_MODES', 'IMAGE_SUFFIXES', 'ANNOTATIONS_FILE',
    'create_model', 'body_part_of_path', 'part_named', 'resample_indices', 'aggregate_views',
    'Predictor', 'MuraDataError', 'is_disk_full'])
def test_each_fact_is_defined_once(name):
  assert len(_definitions(name)) == 1, _definitions(name)


def test_the_layout_map_names_every_module():
  # docs/layout.md's tree is the map a newcomer reads: every module of the packages is on it,
  # and every module it names exists.
  text = (REPO / 'docs' / 'layout.md').read_text()
  tree = text[text.index('```\nconfigs/'):]
  named = set(re.findall(r'\b(\w+\.py)\b', tree[:tree.index('```', 4)]))
  modules = {p.name for p in _sources() if p.name not in ('__init__.py', '__main__.py')}
  configs = {p.name for p in (REPO / 'configs').glob('*.py')}
  assert modules - named == set()
  assert named - modules - configs - {'test_layout.py'} == set()


def test_configs_are_importable_from_the_package():
  # The embedded default lives inside the package (any install has it); configs/ files build on
  # mura_jax.configs and never put their own folder on sys.path.
  assert (REPO / 'mura_jax' / 'configs' / 'demo.py').exists()
  for path in (REPO / 'configs').glob('*.py'):
    text = path.read_text()
    assert 'sys.path' not in text and 'import common' not in text, path
