"""Sphinx configuration: the API reference, built from the docstrings (make docs)."""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "src")))

project = "lowmemws"
author = "lowmemws authors"
copyright = "lowmemws authors"
extensions = ["sphinx.ext.autodoc", "sphinx.ext.napoleon"]

# Docstrings start with the name they document and keep sections Google-style ("Raises:").
napoleon_google_docstring = True
napoleon_numpy_docstring = False
autodoc_member_order = "bysource"
autodoc_typehints = "signature"
autodoc_default_options = {"members": True, "show-inheritance": True}
# `name` in a docstring is a reference to code, as in Markdown.
default_role = "code"

exclude_patterns = ["_build"]
html_theme = "alabaster"
