# Configuration of the Sphinx documentation (cookiecutter-scverse layout).
# Build with `make docs` or `sphinx-build -M html docs docs/_build -W --keep-going`.
from __future__ import annotations

import os
import shutil
import socket
import sys
import warnings
from datetime import datetime
from importlib.metadata import metadata
from pathlib import Path

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE / "extensions"))

# sphinx-autodoc-typehints calls an API that Sphinx 10 removes; not our warning to act on
warnings.filterwarnings(
    "ignore", message=".*set_application.*is deprecated", module="sphinx_autodoc_typehints.*"
)

# -- Project information -----------------------------------------------------------------------

info = metadata("mcvi-ops")
project = "mcvi-ops"
author = info.get("Author") or "mcvi-ops developers"
copyright = f"{datetime.now():%Y}, {author}"
version = info["Version"]
release = version
repository_url = "https://github.com/mcvi-ops/mcvi-ops"

# -- General configuration ---------------------------------------------------------------------

extensions = [
    "myst_nb",
    "sphinx_copybutton",
    "sphinx.ext.autodoc",
    "sphinx.ext.intersphinx",
    "sphinx.ext.autosummary",
    "sphinx.ext.napoleon",
    "sphinx_autodoc_typehints",  # after napoleon
    "sphinx.ext.mathjax",
    *[p.stem for p in (HERE / "extensions").glob("*.py")],
]

templates_path = ["_templates"]
exclude_patterns = ["_build", "Thumbs.db", ".DS_Store", "**.ipynb_checkpoints"]
source_suffix = {".rst": "restructuredtext", ".ipynb": "myst-nb", ".md": "myst-nb"}
master_doc = "index"
default_role = "literal"
nitpicky = True  # every cross-reference must resolve

# autodoc / autosummary: stubs are generated into docs/generated/ (gitignored)
autosummary_generate = True
autodoc_member_order = "groupwise"
autoclass_content = "class"
autodoc_typehints = "description"

# numpy-style docstrings
napoleon_google_docstring = False
napoleon_numpy_docstring = True
napoleon_include_init_with_doc = False
napoleon_use_rtype = True
napoleon_use_param = True
typehints_defaults = "braces"
typehints_document_rtype = True
always_use_bars_union = True

# The tutorials live in ../tutorials (runnable from there); Sphinx only reads files under docs/,
# so they are copied into the gitignored docs/generated/ at every build.
_NOTEBOOKS = HERE / "generated" / "notebooks"
_NOTEBOOKS.mkdir(parents=True, exist_ok=True)
for _notebook in sorted((HERE.parent / "tutorials").glob("*.ipynb")):
    shutil.copy2(_notebook, _NOTEBOOKS / _notebook.name)

# MyST and notebooks: docs never train models, notebooks are shown as saved
myst_enable_extensions = [
    "amsmath",
    "colon_fence",
    "deflist",
    "dollarmath",
    "html_image",
    "html_admonition",
]
myst_heading_anchors = 6
myst_url_schemes = ("http", "https", "mailto")
nb_execution_mode = "off"
nb_merge_streams = True

# -- Cross-references to other projects --------------------------------------------------------

intersphinx_mapping = {
    "python": ("https://docs.python.org/3", None),
    "numpy": ("https://numpy.org/doc/stable", None),
    "pandas": ("https://pandas.pydata.org/pandas-docs/stable", None),
    "scipy": ("https://docs.scipy.org/doc/scipy", None),
    "anndata": ("https://anndata.readthedocs.io/en/stable", None),
    "mudata": ("https://mudata.readthedocs.io/en/latest", None),
    "scanpy": ("https://scanpy.readthedocs.io/en/stable", None),
    "scvi-tools": ("https://docs.scvi-tools.org/en/stable", None),
    "torch": ("https://docs.pytorch.org/docs/stable", None),
    "lightning": ("https://lightning.ai/docs/pytorch/stable", None),
    "zarr": ("https://zarr.readthedocs.io/en/stable", None),
    "matplotlib": ("https://matplotlib.org/stable", None),
    "sklearn": ("https://scikit-learn.org/stable", None),
    "skimage": ("https://scikit-image.org/docs/stable", None),
    "distributed": ("https://distributed.dask.org/en/stable", None),
}
intersphinx_timeout = 10

# Genuinely unresolvable third-party references: none of these projects publish the object
# in their inventories.
nitpick_ignore = [
    ("py:class", "rich.table.Table"),  # rich documents it, but has no Sphinx inventory
    ("py:class", "torch.utils.data.dataset.Dataset"),  # torch documents the public alias only
    ("py:class", "torch.utils.data.sampler.Sampler"),
    ("py:class", "torch.utils.data.dataloader.DataLoader"),
    ("py:class", "lightning.pytorch.core.datamodule.LightningDataModule"),
    ("py:class", "zarr.core.array.Array"),  # zarr v3 documents the public alias only
    ("py:class", "zarr.abc.store.Store"),
    # the signature of scvi-tools' TrainRunner.__init__, which ImageTrainRunner inherits: string
    # annotations under names that scvi-tools imports but does not publish
    ("py:class", "BaseModelClass"),
    ("py:class", "pl.LightningModule"),
    ("py:class", "DataSplitter"),
    ("py:class", "SemiSupervisedDataSplitter"),
    ("py:class", "KwargsLike"),
]
nitpick_ignore_regex: list[tuple[str, str]] = []

# Offline builds (no network, e.g. a sandbox): without the inventories every reference to
# numpy/pandas/... would be unresolvable. Keep `nitpicky` for our own names and ignore only
# references into the projects listed in `intersphinx_mapping`. Set MCVI_OPS_DOCS_OFFLINE=0/1
# to skip the probe.


def _online() -> bool:
    forced = os.environ.get("MCVI_OPS_DOCS_OFFLINE")
    if forced is not None:
        return forced.strip().lower() in ("0", "false", "no", "")
    try:
        socket.create_connection(("docs.python.org", 443), timeout=3).close()
    except OSError:
        return False
    return True


if not _online():
    print("mcvi-ops docs: offline build; references into other projects are not checked.")
    intersphinx_mapping = {}
    _external = [
        "anndata", "collections", "builtins", "distributed", "lightning", "matplotlib", "mudata",
        "numpy", "np",
        "os", "pandas", "pd", "pathlib", "rich", "scanpy", "scipy", "scvi", "skimage", "sklearn", "torch",
        "typing", "zarr",
    ]  # fmt: skip
    nitpick_ignore_regex += [(r"py:.*", rf"{module}(\..*)?") for module in _external]
    nitpick_ignore_regex += [
        (r"py:.*", r"AnnData|ndarray|DataFrame|Series|Tensor|Module|Axes|Generator|Path|PathLike"),
        (r"py:.*", r"int|float|str|bool|bytes|dict|list|tuple|None|object|type|slice|Any|Literal"),
        (r"py:.*", r"Sequence|Mapping|Iterable|Iterator|Callable|optional|default"),
    ]

# -- Options for HTML output -------------------------------------------------------------------

html_theme = "sphinx_book_theme"
html_title = project
html_theme_options = {
    "repository_url": repository_url,
    "use_repository_button": True,
    "path_to_docs": "docs/",
    "navigation_with_keys": False,
}
html_show_sphinx = False
pygments_style = "default"
copybutton_prompt_text = r">>> |\.\.\. |\$ "
copybutton_prompt_is_regexp = True

# -- Members documented on class pages ---------------------------------------------------------

# Inherited members that matter to users of our models (the rest of scvi-tools' BaseModelClass,
# and everything torch / Lightning classes inherit, stays out of our pages).
_INHERITED_KEEP = {
    "save",
    "load",
    "history",
    "is_trained",
    "device",
    "to_device",
    "view_anndata_setup",
}


def _origin(obj) -> str:
    for candidate in (obj, getattr(obj, "__func__", None), getattr(obj, "fget", None)):
        module = getattr(candidate, "__module__", None)
        if isinstance(module, str):
            return module
    return ""


def _skip_member(app, what, name, obj, skip, options):
    # autodoc passes the parent's type ("class"), autosummary the member's ("method", ...)
    if what in ("module", "function", "data", "exception") or skip or name.startswith("_"):
        return None
    origin = _origin(obj)
    if origin.startswith("mcvi_ops") or name in _INHERITED_KEEP:
        return None
    return True  # inherited from scvi-tools, torch, Lightning, ... : document it there


# -- Every public name is in the API reference ---------------------------------------------------

# Subpackages whose `__all__` api.md must list in full (warnings fail the `-W` build); the
# lazily moved names of `mcvi_ops.data` and `mcvi_ops.io` are not in their `__all__`.
_API_PACKAGES = (
    "data", "dataloaders", "datasets", "io", "metrics", "model", "module", "nn", "pl", "pp", "tl",
    "train",
)  # fmt: skip


def _check_api_listing(app):
    import importlib
    import re

    from sphinx.util import logging as sphinx_logging

    log = sphinx_logging.getLogger(__name__)
    text = (HERE / "api.md").read_text(encoding="utf-8")
    # each `.. module:: X` starts the list of X's entries, up to the next module
    listed: dict[str, set[str]] = {}
    for module, body in re.findall(r"\.\. module:: (\S+)\n(.*?)(?=\.\. module::|\Z)", text, re.S):
        listed[module] = set(re.findall(r"^ {4}(\w+)$", body, re.M))
    for name in _API_PACKAGES:
        module = f"mcvi_ops.{name}"
        public = set(importlib.import_module(module).__all__)
        if module == "mcvi_ops.model":  # the models are documented as mcvi_ops.MCVAE / .VAE
            public -= set(listed.get("mcvi_ops", ()))
        missing = sorted(public - listed.get(module, set()))
        if missing:
            log.warning("docs/api.md does not list %s from %s.__all__", missing, module)


def setup(app):
    """Hide inherited third-party members from class pages; check api.md lists every name."""
    app.connect("autodoc-skip-member", _skip_member)
    app.connect("builder-inited", _check_api_listing)
