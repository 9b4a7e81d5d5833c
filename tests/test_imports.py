"""The device side must not need torch, numba or a built native library."""

import subprocess
import sys

BLOCK = """
import importlib.abc, sys
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split('.')[0] in ('torch', 'numba', 'transformers'):
            raise ImportError('blocked for the test: ' + name)
sys.meta_path.insert(0, Block())
"""


def test_device_side_imports_without_torch(stories_path):
    code = BLOCK + f"""
import edge_awq, edge_awq.cli, edge_awq.commands.eval, edge_awq.formats.load, edge_awq.model, edge_awq.ops
import edge_awq.perplexity, edge_awq.formats.tokenizer, edge_awq.formats.tensorfile, edge_awq.backends.reference
import edge_awq.formats.sources.hf, edge_awq.formats.sources.gguf, edge_awq.formats.sources.llama2c
from edge_awq.cli import main
sys.exit(main(['eval', {str(stories_path)!r}, '--text', {str(stories_path.parents[2] / 'data' / 'tinystories-valid-sample.txt')!r}, '--max-tokens', '100']))
"""
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("perplexity ")


def test_torch_is_not_loaded_by_the_cli():
    r = subprocess.run([sys.executable, "-c", "import sys, edge_awq.cli; edge_awq.cli._parser('eval');"
                        "print('torch' in sys.modules)"], capture_output=True, text=True)
    assert r.stdout.strip() == "False", r.stderr


def test_export_without_torch_says_what_to_install(stories_path, tmp_path):
    code = BLOCK.replace("raise ImportError('blocked for the test: ' + name)",
                         "raise ModuleNotFoundError('No module named ' + repr(name), name=name)") + f"""
from edge_awq.cli import main
sys.exit(main(['export', {str(stories_path)!r}, '--calib', {str(stories_path)!r}, '-o', {str(tmp_path / 'x.eawq')!r}]))
"""
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 2 and r.stderr.strip() == "edge-awq export: error: needs torch: pip install 'edge-awq[offline]'"
