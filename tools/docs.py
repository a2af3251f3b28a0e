"""Build the documentation site offline (`make docs`): every notebook as a page with its stored outputs, an API
reference generated from the package, and Sphinx's search.

    python tools/docs.py [--site _site] [--src _docs_src]

The notebooks are staged into `--src` (cells marked `#| hide`, the `#| default_exp` cell and the `nbdev_export()`
cell are left out, as nbdev's own docs leave them out), one API page per module of `videolights` is written beside
them, and `sphinx-build` (configuration in docs/conf.py) renders everything into `--site`. Nothing is executed:
the pages show the outputs that `make notebooks` stored. Open `_site/index.html` in a browser.
"""
import argparse, json, re, shutil, subprocess, sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
NBS, LIB = ROOT/'nbs', ROOT/'videolights'
_DIRECTIVE = re.compile(r'^\s*#\|\s*(\S+)')


def notebooks()->list:
    "The notebooks of the site in order: index first, then the chapters (`_*` scratch notebooks are left out)."
    nbs = sorted(p for p in NBS.glob('*.ipynb') if not p.name.startswith('_') and p.name != 'index.ipynb')
    return [NBS/'index.ipynb', *nbs]


def modules()->list:
    "The documented modules of the package: every generated `videolights/*.py` (not `_modidx`, `__main__`)."
    return sorted(p.stem for p in LIB.glob('*.py') if not p.name.startswith('_'))


def module_notebook(mod:str)->str|None:
    "The notebook (stem) that exports `mod`, from its `#| default_exp` cell."
    for p in notebooks():
        if re.search(rf'#\|\s*default_exp\s+{re.escape(mod)}\b', p.read_text(encoding='utf-8')): return p.stem
    return None


def _src(cell)->str:
    s = cell.get('source', '')
    return ''.join(s) if isinstance(s, list) else s


def _directives(src:str)->set:
    out = set()
    for line in src.splitlines():
        m = _DIRECTIVE.match(line)
        if not m: break
        out.add(m[1].rstrip(':'))
    return out


def _shown(cell)->bool:
    "Whether a cell appears on the page (nbdev's docs hide these too)."
    if cell['cell_type'] != 'code': return True
    src, d = _src(cell), _directives(_src(cell))
    if 'hide' in d or 'default_exp' in d or 'nbdev_export' + '(' in src: return False
    return bool(src.strip())


def _md(text:str, id:str)->dict:
    return {'cell_type': 'markdown', 'id': id, 'metadata': {}, 'source': text}


def _toctree(caption:str, entries:list)->str:
    return '\n'.join([f'```{{toctree}}', f':caption: {caption}', ':maxdepth: 1', '', *entries, '```'])


def stage(src:Path)->list:
    "Write the site's sources into `src`: staged notebooks, API pages and the tables of contents; return the pages."
    if src.exists(): shutil.rmtree(src)
    (src/'api').mkdir(parents=True)
    pages = []
    for p in notebooks():
        nb = json.loads(p.read_text(encoding='utf-8'))
        nb['cells'] = [c for c in nb['cells'] if _shown(c)]
        if p.name == 'index.ipynb':
            nb['cells'].append(_md(_toctree('Chapters', [q.stem for q in notebooks()[1:]]), 'toc-chapters'))
            nb['cells'].append(_md(_toctree('API reference', ['api/index']), 'toc-api'))
        (src/p.name).write_text(json.dumps(nb, indent=1, ensure_ascii=False), encoding='utf-8')
        pages.append(p.stem)
    for m in modules():
        nbk = module_notebook(m)
        origin = f'Generated from the docstrings of `videolights.{m}`' + (
            f', exported from the notebook [{nbk}](../{nbk}.ipynb).' if nbk else '.')
        (src/'api'/f'{m}.md').write_text(
            f'# `videolights.{m}`\n\n{origin}\n\n```{{eval-rst}}\n.. automodule:: videolights.{m}\n```\n',
        encoding='utf-8')
        pages.append(f'api/{m}')
    (src/'api'/'index.md').write_text(
        '# API reference\n\nEvery exported function and class, with its signature, docstring and the comment of '
        'each parameter, module by module.\n\n' + _toctree('Modules', modules()) + '\n', encoding='utf-8')
    pages.append('api/index')
    return pages


def build(site:Path, src:Path, quiet:bool=True)->int:
    "Stage the sources and render them with Sphinx into `site`; return sphinx-build's exit status."
    stage(src)
    out = src/'_build'/'html'                       # myst-nb writes beside the output folder: keep it all in `src`
    cmd = [sys.executable, '-m', 'sphinx', '-b', 'html', '-c', str(ROOT/'docs'), '-d', str(src/'_build'/'doctrees'),
           *(['-q'] if quiet else []), str(src), str(out)]
    r = subprocess.run(cmd, cwd=ROOT).returncode
    if r: return r
    if site.exists(): shutil.rmtree(site)
    shutil.move(str(out), str(site))
    print(f'site: {site/"index.html"} ({len(list(site.rglob("*.html")))} pages)')
    return 0


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    ap.add_argument('--site', default=str(ROOT/'_site'), help='output folder (git-ignored)')
    ap.add_argument('--src', default=str(ROOT/'_docs_src'), help='staging folder (git-ignored)')
    ap.add_argument('--verbose', action='store_true', help="show Sphinx's progress")
    a = ap.parse_args(argv)
    sys.exit(build(Path(a.site), Path(a.src), quiet=not a.verbose))


if __name__ == '__main__': main()
