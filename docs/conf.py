"""Sphinx configuration of the skpadim documentation.

Build (from the repository root)::

    python -m sphinx -W --keep-going -b html docs docs/_build/html

Environment switches, all off by default so that the build is fast and works
without network access:

``SKPADIM_DOCS_RUN_EXAMPLES=1``
    Execute the gallery scripts ``examples/plot_*.py`` and embed their
    figures and output. Off: the gallery pages show the code only.
    ``-D plot_gallery=1`` on the command line has the same effect.
``SKPADIM_DOCS_INTERSPHINX=1``
    Link names of Python, NumPy, SciPy, scikit-learn, PyTorch and joblib to
    their online documentation (downloads the inventories at build time).
"""

import os
import sys
from pathlib import Path

DOCS_DIR = Path(__file__).resolve().parent
# Import the checkout being documented, even when another copy is installed.
sys.path.insert(0, str(DOCS_DIR.parent))

import skpadim  # noqa: E402


def _env_flag(name, default="0"):
    """Whether the environment variable ``name`` is set to a true value."""
    value = os.environ.get(name, default).strip().lower()
    return value not in ("", "0", "false", "no", "off")


RUN_EXAMPLES = _env_flag("SKPADIM_DOCS_RUN_EXAMPLES")
USE_INTERSPHINX = _env_flag("SKPADIM_DOCS_INTERSPHINX")

# -- Project -----------------------------------------------------------------

project = "skpadim"
author = "The skpadim developers"
copyright = "The skpadim developers; BSD-3-Clause licence"
release = skpadim.__version__
version = ".".join(release.split(".")[:2])

# -- General -----------------------------------------------------------------

extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.autosummary",
    "sphinx.ext.mathjax",
    "numpydoc",
    "sphinx_gallery.gen_gallery",
]
if USE_INTERSPHINX:
    extensions.append("sphinx.ext.intersphinx")

templates_path = ["_templates"]
exclude_patterns = [
    "_build",
    "Thumbs.db",
    ".DS_Store",
]
root_doc = "index"
default_role = "literal"
pygments_style = "sphinx"
highlight_language = "python3"

# -- autodoc / autosummary / numpydoc ---------------------------------------

autosummary_generate = True
autodoc_typehints = "none"
# Methods are listed by the class template (_templates/autosummary/class.rst).
numpydoc_show_class_members = False
# numpydoc validation: every check, except four that the project's
# docstrings do not follow, as in scikit-learn: an extended summary (ES01), a
# See Also section (SA01) and an Examples section (EX01) are optional on
# methods and small helpers, and Returns entries are named,
# ``scores : ndarray of shape (n,)`` (RT02). A failed check is a build
# warning, hence an error under -W.
numpydoc_validation_checks = {"all", "ES01", "SA01", "EX01", "RT02"}
# Inherited scikit-learn methods: their docstrings are scikit-learn's, not ours.
numpydoc_validation_exclude = {
    r"\.get_params$",
    r"\.set_params$",
    r"\.fit_transform$",
    r"^skpadim\.PatchGaussian\.fit_predict$",
}

# -- HTML --------------------------------------------------------------------

html_theme = "pydata_sphinx_theme"
html_title = f"skpadim {release}"
html_short_title = "skpadim"
html_static_path = []
html_show_sourcelink = False
html_theme_options = {
    "navigation_with_keys": False,
    "show_toc_level": 2,
    "header_links_before_dropdown": 6,
    "navbar_align": "left",
    "secondary_sidebar_items": ["page-toc"],
    "footer_start": ["copyright"],
    "footer_end": ["sphinx-version"],
}
html_sidebars = {
    # One page per section: no left sidebar where it would be empty.
    "index": [],
    "install": [],
    "quick_start": [],
    "references": [],
}
html_context = {"default_mode": "light"}

# -- sphinx-gallery ----------------------------------------------------------

# Read by sphinx-gallery as a config value: "False" builds the gallery pages
# from the scripts' source without running them.
plot_gallery = "True" if RUN_EXAMPLES else "False"

sphinx_gallery_conf = {
    "examples_dirs": "../examples",
    "gallery_dirs": "auto_examples",
    "filename_pattern": r"/plot_",
    "ignore_pattern": r"__init__\.py",
    "within_subsection_order": "FileNameSortKey",
    # Mini-galleries on the API pages: examples that use an object.
    "doc_module": ("skpadim",),
    "backreferences_dir": "gen_modules/backreferences",
    "remove_config_comments": True,
    "image_scrapers": ("matplotlib",),
    "matplotlib_animations": False,
    "download_all_examples": False,
    "show_signature": False,
    # A failing example fails the build (when examples are run at all).
    "only_warn_on_example_error": False,
}

# -- intersphinx (opt-in) ----------------------------------------------------

intersphinx_mapping = {
    "python": ("https://docs.python.org/3", None),
    "numpy": ("https://numpy.org/doc/stable", None),
    "scipy": ("https://docs.scipy.org/doc/scipy", None),
    "sklearn": ("https://scikit-learn.org/stable", None),
    "torch": ("https://docs.pytorch.org/docs/stable", None),
    "joblib": ("https://joblib.readthedocs.io/en/stable", None),
    "matplotlib": ("https://matplotlib.org/stable", None),
}
