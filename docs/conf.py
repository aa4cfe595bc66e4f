"""Sphinx configuration of the lora_jax documentation.

Build (offline, warnings as errors; tests/test_docs.py runs the same):

    python -m sphinx -W --keep-going -b html docs docs/_build/html

Pages are Markdown (MyST). The guides index picks up every
``docs/guides/*.md``; the API reference is generated from the docstrings
(Google style, via napoleon).
"""

import os
import sys

sys.path.insert(0, os.path.abspath(".."))  # this checkout's lora_jax, not an installed one

project = "lora_jax"
author = "lora_jax contributors"
copyright = "2026, lora_jax contributors"  # noqa: A001 (Sphinx's name)

extensions = [
    "myst_parser",
    "sphinx.ext.autodoc",
    "sphinx.ext.napoleon",
    "sphinx.ext.viewcode",
]
source_suffix = {".md": "markdown", ".rst": "restructuredtext"}
root_doc = "index"
exclude_patterns = ["_build", "Thumbs.db", ".DS_Store"]

myst_heading_anchors = 3          # [text](page.md#a-heading) links, as on GitHub
myst_enable_extensions = ["colon_fence"]

napoleon_google_docstring = True
napoleon_numpy_docstring = False
napoleon_use_ivar = True       # "Attributes:" as fields, not a second description of each
autodoc_member_order = "bysource"
autodoc_typehints = "signature"
autodoc_default_options = {"members": True, "undoc-members": False}

html_theme = "alabaster"
html_title = "lora_jax"
html_static_path = []
