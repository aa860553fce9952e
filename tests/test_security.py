"""Security hygiene of the source tree: no remote code, no pickle from files.

Model weights come through safetensors (``from_pretrained`` prefers them; a pickled ``.bin`` fallback goes through
the libraries' ``torch.load(weights_only=True)``), real latents through ``safe_open``, checkpoints through
``torch.load`` with ``weights_only`` (Lightning passes None, which torch >= 2.6 treats as True). This test reads
the code (not the tests) and fails on any call that would run code from a file or a hub repository.
"""

from __future__ import annotations

import ast

from conftest import REPO

SCANNED = [REPO / "comat_lightning", REPO / "callbacks", REPO / "datamodules", REPO / "scripts", REPO / "benchmarks", REPO / "train.py"]
UNPICKLERS = {"pickle", "cPickle", "_pickle", "dill", "cloudpickle", "joblib", "shelve", "marshal"}
SAFE_YAML_LOADERS = {"SafeLoader", "CSafeLoader", "BaseLoader", "CBaseLoader"}


def _name(node: ast.AST) -> str:
    """Dotted name of a call's function: "torch.load", "yaml.load", "load"."""
    if isinstance(node, ast.Attribute):
        return f"{_name(node.value)}.{node.attr}"
    return node.id if isinstance(node, ast.Name) else ""


def _constant(node: ast.AST | None, value: object) -> bool:
    return isinstance(node, ast.Constant) and node.value is value


def unsafe_calls(source: str) -> list[str]:
    """Each unsafe call in ``source`` as "line: what"."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            modules = [alias.name for alias in node.names] if isinstance(node, ast.Import) else [node.module or ""]
            found += [f"{node.lineno}: import {m}" for m in modules if m.split(".")[0] in UNPICKLERS]
        if not isinstance(node, ast.Call):
            continue
        name, keywords = _name(node.func), {k.arg: k.value for k in node.keywords}
        if "trust_remote_code" in keywords and not _constant(keywords["trust_remote_code"], False):
            found.append(f"{node.lineno}: {name}(trust_remote_code=...)")
        saving = "save" in name.split(".")[-1]  # save_checkpoint(weights_only=...) chooses what to write
        if "weights_only" in keywords and not saving and not _constant(keywords["weights_only"], True):
            found.append(f"{node.lineno}: {name}(weights_only not True)")
        if name.endswith("torch.load") and "weights_only" not in keywords:
            found.append(f"{node.lineno}: torch.load without weights_only=True")
        if "allow_pickle" in keywords and not _constant(keywords["allow_pickle"], False):
            found.append(f"{node.lineno}: {name}(allow_pickle=...)")
        if name.split(".")[0] in UNPICKLERS and name.split(".")[-1] in ("load", "loads", "Unpickler", "open"):
            found.append(f"{node.lineno}: {name}")
        if name in ("yaml.unsafe_load", "yaml.full_load", "yaml.unsafe_load_all", "yaml.full_load_all"):
            found.append(f"{node.lineno}: {name}")
        if name in ("yaml.load", "yaml.load_all"):
            loader = keywords.get("Loader", node.args[1] if len(node.args) > 1 else None)
            if _name(loader).split(".")[-1] not in SAFE_YAML_LOADERS:
                found.append(f"{node.lineno}: {name} without a safe Loader")
    return found


def test_the_scanner_finds_each_unsafe_form():
    bad = """
import pickle
from transformers import AutoModel
AutoModel.from_pretrained("x", trust_remote_code=True)
torch.load("a.ckpt", weights_only=False)
trainer.fit(model, ckpt_path="last", weights_only=False)
numpy.load("a.npy", allow_pickle=True)
pickle.loads(data)
yaml.load(text)
yaml.load(text, Loader=yaml.Loader)
yaml.full_load(text)
"""
    assert [entry.split(": ", 1)[0] for entry in unsafe_calls(bad)] == ["2", "4", "5", "6", "7", "8", "9", "10", "11"]
    assert "torch.load without weights_only=True" in unsafe_calls('torch.load("a.ckpt")')[0]
    good = 'torch.load("a.ckpt", weights_only=True)\ntrainer.save_checkpoint("a.ckpt", weights_only=False)\nyaml.load(text, Loader=yaml.SafeLoader)\nyaml.safe_load(text)\nnp.load("a.npy")\n'
    assert unsafe_calls(good) == []


def test_the_source_tree_loads_nothing_unsafely():
    files = [p for root in SCANNED for p in ([root] if root.is_file() else sorted(root.rglob("*.py")))]
    assert len(files) > 30
    problems = [f"{path.relative_to(REPO)}:{entry}" for path in files for entry in unsafe_calls(path.read_text())]
    assert problems == []


def test_no_config_asks_for_remote_code():
    configs = sorted((REPO / "configs").rglob("*.yaml")) + [REPO / "config.yaml"]
    assert [str(p.relative_to(REPO)) for p in configs if p.is_file() and "trust_remote_code" in p.read_text()] == []
