"""Every dotted ``memcore.*`` name and every repository path that README.md and docs/*.md
mention exists: the name imports (module, then attributes), the path is in the checkout.
Placeholders a reader is meant to replace are listed in :data:`PLACEHOLDERS`."""

from __future__ import annotations

import importlib
import pathlib
import re

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]

# Names and paths in the docs that stand for the reader's own (e.g. a new backend's).
PLACEHOLDERS = {
    "memcore_myfw",
    "memcore-myfw",
    "my_xfails.txt",
    "report.json",
    "memcore_template",  # the template's package, installed from examples/template_backend
}
FILE_NAMES = {"memcore.toml"}
_SUFFIXES = (".py", ".md", ".toml", ".txt", ".sh", ".json", ".png", ".cfg", ".yml", ".yaml")


def _spans() -> list[tuple[str, str]]:
    """(doc name, text in backticks or a markdown link target) for every doc."""
    out = []
    for doc in DOCS:
        text = doc.read_text(encoding="utf-8")
        for span in re.findall(r"`([^`\n]+)`", text):
            out.append((doc.name, span))
        for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", text):
            if not target.startswith(("http://", "https://", "mailto:")):
                out.append((doc.name, str((doc.parent / target).relative_to(ROOT))))
    return out


def dotted_names() -> list[tuple[str, str]]:
    """Every ``memcore.a.b`` name (call parentheses and arguments dropped)."""
    found = set()
    for doc, span in _spans():
        for name in re.findall(r"\bmemcore(?:\.[A-Za-z_]\w*)+", span):
            if name.endswith(_SUFFIXES) or name in FILE_NAMES:
                continue  # a file name such as memcore.toml
            if not any(p in name for p in PLACEHOLDERS):
                found.add((doc, name))
    return sorted(found)


def repo_paths() -> list[tuple[str, str]]:
    """Every span that is a relative path into the repository (has a / or a known suffix)."""
    found = set()
    for doc, span in _spans():
        for token in span.split():
            token = token.strip("'\",;:()")
            looks_like_path = "/" in token or token.endswith(_SUFFIXES)
            if not looks_like_path or token.startswith(("-", "http", "$", "~", "/", "<")):
                continue
            if any(p in token for p in PLACEHOLDERS) or "<" in token or "*" in token:
                continue
            if not re.fullmatch(r"[\w./-]+", token) or (token.count("/") == 0 and "." not in token):
                continue
            found.add((doc, token))
    return sorted(found)


def _resolve(name: str) -> object:
    parts = name.split(".")
    for cut in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:cut]))
        except ImportError:
            continue
        for attr in parts[cut:]:
            obj = getattr(obj, attr)
        return obj
    raise ImportError(name)


@pytest.mark.parametrize(("doc", "name"), dotted_names())
def test_dotted_name_imports(doc, name):
    """A memcore.* name in the docs resolves to a module or attribute."""
    try:
        _resolve(name)
    except (ImportError, AttributeError) as exc:
        pytest.fail(f"{doc} mentions {name!r}, which does not exist: {exc}")


# Folders whose files the docs also cite by bare name (in a sentence about that folder).
RESULT_DIRS = ("bench/results", "results")
# Spans with a slash that are not paths: GitHub projects cited as sources, and math.
KNOWN_NON_PATHS = {
    "lucidrains/memformer",
    "nke001/sparse_attentive_backtracking_release",
    "qywu/memformers",
    "dL/dM_0",
    "dl_t/dy_t",
    "dy/1e-12",
    "./memcore.toml",  # the user's own project file (README's backend precedence)
    "dL/dparams",  # a derivative in models.md, not a path
    "layers_torch.py",  # files of the SAB authors' release (semantics.md R.9), not ours
    "train_copying_torch.py",
}


def _exists(token: str) -> bool:
    if (ROOT / token).exists() or (ROOT / "docs" / token).exists():
        return True
    if "/" not in token:
        return any(next((ROOT / d).rglob(token), None) for d in RESULT_DIRS if (ROOT / d).is_dir())
    return False


@pytest.mark.parametrize(
    ("doc", "path"), [(d, p) for d, p in repo_paths() if p not in KNOWN_NON_PATHS]
)
def test_repository_path_exists(doc, path):
    """A repository path in the docs exists in the checkout (source layout: conformance/x.py,
    not the installed memcore/conformance/x.py)."""
    assert _exists(path), f"{doc} mentions {path!r}, which is not in the repository"


def test_known_non_paths_are_still_mentioned():
    """Every KNOWN_NON_PATHS entry still occurs in the docs (the allowlist cannot rot)."""
    mentioned = {p for _, p in repo_paths()}
    assert mentioned >= KNOWN_NON_PATHS, sorted(KNOWN_NON_PATHS - mentioned)
