"""Sphinx configuration of the documentation site (`make docs`; see tools/docs.py, which stages the pages).

The notebooks are rendered with their stored outputs (myst-nb, execution off); the API reference comes from the
docstrings, signatures and docments of the installed `videolights` package (autodoc)."""
import inspect, re
from fastcore.docments import docments

project = 'videolights'
author = 'videolights developers'
copyright = '2026 onwards, videolights developers'
root_doc = 'index'
extensions = ['myst_nb', 'sphinx.ext.autodoc', 'sphinx.ext.viewcode']
exclude_patterns = ['_build', 'jupyter_execute', '**.ipynb_checkpoints']

# notebooks: never executed here, outputs as stored by `make notebooks`
nb_execution_mode = 'off'
nb_merge_streams = True
nb_output_stderr = 'show'
myst_enable_extensions = ['dollarmath', 'amsmath']
myst_heading_anchors = 3
suppress_warnings = ['myst.header', 'mystnb.unknown_mime_type', 'misc.highlighting_failure']

# API: `backticked` names in docstrings are code, parameters documented by their docments comments
default_role = 'code'
autodoc_member_order = 'bysource'
autodoc_default_options = {'members': True, 'show-inheritance': True}
autodoc_typehints = 'signature'

html_theme = 'furo'
html_title = 'videolights'
html_show_sourcelink = False
html_copy_source = False


def _md_inline(s:str)->str:
    "A Markdown docstring line (nbdev) as reST: `code` spans as literals, also glued to words; a lone `*` escaped."
    star = lambda t: re.sub(r"(?<=[/'])\*|\*(?=[,'/])", r'\\*', t)
    out, pos = [], 0
    for m in re.finditer(r'`([^`]+)`', s):
        before, after = s[m.start() - 1:m.start()], s[m.end():m.end() + 1]
        out += [star(s[pos:m.start()]), '\\ ' if re.match(r'[\w*]', before) else '', f'``{m[1]}``',
                '\\ ' if re.match(r'\w', after) else '']
        pos = m.end()
    return ''.join(out + [star(s[pos:])])


def _docments(app, what, name, obj, options, lines):
    "Append each parameter's docments comment (`x:int, # what x is`) as a `:param:` field."
    lines[:] = [_md_inline(l) for l in lines]
    if what not in ('function', 'method', 'class') or not callable(obj): return
    try: d = docments(obj, full=True)
    except Exception: return
    if inspect.isclass(obj) and not any(v.get('docment') for v in d.values()): return
    if lines and lines[-1].strip(): lines.append('')
    for k, v in d.items():
        doc = (v.get('docment') or '').strip()
        if not doc: continue
        lines.append(_md_inline(f':returns: {doc}' if k == 'return' else f':param {k}: {doc}'))


def setup(app):
    app.connect('autodoc-process-docstring', _docments)
