"""Sphinx configuration of the skpadim documentation.

Build (from the repository root)::

    make docs        # examples executed in quick mode, as in CI
    make docs-full   # examples executed at full size (long on a CPU)

or directly::

    SKPADIM_DOCS_RUN_EXAMPLES=1 SKPADIM_EXAMPLES_QUICK=1 \\
        python -m sphinx -W --keep-going -b html docs docs/_build/html

Environment switches, read here:

``SKPADIM_DOCS_RUN_EXAMPLES=1``
    Execute the gallery scripts ``examples/plot_*.py`` and embed their
    figures and printed output. Off (the default of a bare ``sphinx``
    call): the gallery pages show the code only. ``-D plot_gallery=1`` on
    the command line has the same effect.
``SKPADIM_EXAMPLES_QUICK=1``
    Read by the examples themselves: fewer images, smaller frames, so that
    the whole gallery runs in a few minutes on a 2-core CPU. ``make docs``
    (and so CI) sets it; ``make docs-full`` does not.
``SKPADIM_DOCS_INTERSPHINX=1``
    Link names of Python, NumPy, SciPy, scikit-learn, PyTorch and joblib to
    their online documentation (downloads the inventories at build time).

The gallery's outputs are cached in ``docs/auto_examples`` and an example
is run again only when its source changes; the cache is dropped whenever
the mode (code only, quick, full) differs from the last build's, so a page
never shows the output of another mode.

Math is rendered by MathJax served from the built site itself
(``_static/mathjax``, copied from the ``sphinx-mathjax-offline`` package),
so the pages need no network access to display formulas.
"""

import os
import shutil
import sys
from pathlib import Path

DOCS_DIR = Path(__file__).resolve().parent
# Import the checkout being documented, even when another copy is installed.
sys.path.insert(0, str(DOCS_DIR.parent))
# Helpers of this configuration (the gallery's example order).
sys.path.insert(0, str(DOCS_DIR / "sphinxext"))

import skpadim  # noqa: E402


def _env_flag(name, default="0"):
    """Whether the environment variable ``name`` is set to a true value."""
    value = os.environ.get(name, default).strip().lower()
    return value not in ("", "0", "false", "no", "off")


RUN_EXAMPLES = _env_flag("SKPADIM_DOCS_RUN_EXAMPLES")
QUICK_EXAMPLES = _env_flag("SKPADIM_EXAMPLES_QUICK")
USE_INTERSPHINX = _env_flag("SKPADIM_DOCS_INTERSPHINX")


def _reset_gallery_if_mode_changed(gallery_dir, mode):
    """Drop the gallery's cached outputs when they come from another mode.

    sphinx-gallery re-runs an example only when its source changes, so
    without this a full build after a quick one would keep the quick
    figures (and the reverse).
    """
    stamp = gallery_dir / ".skpadim_gallery_mode"
    if stamp.is_file() and stamp.read_text().strip() == mode:
        return
    if gallery_dir.exists():
        shutil.rmtree(gallery_dir)
    gallery_dir.mkdir(parents=True)
    stamp.write_text(mode + "\n")


GALLERY_MODE = ("quick" if QUICK_EXAMPLES else "full") if RUN_EXAMPLES else "code-only"
_reset_gallery_if_mode_changed(DOCS_DIR / "auto_examples", GALLERY_MODE)

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
    # Ships MathJax 3 and serves it from _static/mathjax: no CDN at view time.
    "sphinx-mathjax-offline",
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
    # First steps first (docs/sphinxext/gallery_order.py).
    "within_subsection_order": "gallery_order.ExampleOrder",
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
    # Report every example's run time in the build log and sg_execution_times.
    "min_reported_time": 0,
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
