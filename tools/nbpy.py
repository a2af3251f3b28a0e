"""Author notebooks as percent-format text and convert both ways (a dev aid; notebooks stay the source of truth).

    python tools/nbpy.py to-nb SRC.py nbs/NN_name.ipynb   # '# %%' code cells, '# %% [markdown]' markdown cells
    python tools/nbpy.py to-py nbs/NN_name.ipynb OUT.py   # the reverse, to edit a notebook as text

Markdown cell bodies are written as comment lines ('# ' prefix), as jupytext does.
"""
import sys, json, re
import nbformat

_HDR = re.compile(r'^# %%(?:\s*\[(markdown|md)\])?\s*$')

def py_to_nb(src:str):
    cells, kind, buf = [], None, []
    def flush():
        if kind is None: return
        lines = list(buf)
        while lines and not lines[-1].strip(): lines.pop()
        while lines and not lines[0].strip(): lines.pop(0)
        if kind == 'md':
            lines = [l[2:] if l.startswith('# ') else (l[1:] if l.startswith('#') else l) for l in lines]
            cells.append(nbformat.v4.new_markdown_cell('\n'.join(lines)))
        else: cells.append(nbformat.v4.new_code_cell('\n'.join(lines)))
    for line in src.splitlines():
        m = _HDR.match(line)
        if m:
            flush()
            kind, buf = ('md' if m.group(1) else 'code'), []
        else: buf.append(line)
    flush()
    nb = nbformat.v4.new_notebook(cells=cells)
    nb.metadata = {"kernelspec": {"display_name": "python3", "language": "python", "name": "python3"}}
    return nb

def nb_to_py(nb):
    out = []
    for c in nb.cells:
        if c.cell_type == 'markdown':
            out.append('# %% [markdown]')
            out += ['# ' + l if l else '#' for l in c.source.splitlines()]
        else:
            out.append('# %%')
            out += c.source.splitlines()
        out.append('')
    return '\n'.join(out)

if __name__ == '__main__':
    cmd, a, b = sys.argv[1:4]
    if cmd == 'to-nb':
        nb = py_to_nb(open(a).read())
        nbformat.write(nb, b)
    elif cmd == 'to-py':
        open(b, 'w').write(nb_to_py(nbformat.read(a, as_version=4)))
    else: raise SystemExit(__doc__)
