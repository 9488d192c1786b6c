"""A griffe extension for the API reference: seqjax's docstrings head their doctests ``Example:``, which the
Google-style parser reads as plain text; this renames the heading ``Examples:`` so they render as code."""
import re

import griffe

_HEADING = re.compile(r"^(\s*)Example:[ \t]*$", re.MULTILINE)


class ExampleSections(griffe.Extension):
    def on_instance(self, *, obj, **kwargs):
        if obj.docstring is not None:
            obj.docstring.value = _HEADING.sub(r"\1Examples:", obj.docstring.value)
