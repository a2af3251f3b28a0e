"""The documentation site (tools/docs.py, `make docs`): every notebook is a page with its stored outputs, every
module has an API page, and (slow) the built site, served on a loopback port and opened in headless Chromium,
shows the figures of the index, model, loss and visualisation pages and finds API entries with its search box."""
import functools, http.server, importlib.util, json, re, shutil, subprocess, tempfile, threading
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location('docs_tool', ROOT/'tools/docs.py')
docs = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(docs)


def _pngs(nb:dict)->int:
    "Figures (PNG outputs) in the cells of a notebook."
    return sum('image/png' in o.get('data', {}) for c in nb['cells'] for o in c.get('outputs', []))


def test_site_lists_every_notebook_and_module(tmp_path):
    pages = docs.stage(tmp_path)
    nbs = sorted(p.stem for p in (ROOT/'nbs').glob('*.ipynb') if not p.name.startswith('_'))
    assert sorted(p.stem for p in tmp_path.glob('*.ipynb')) == nbs
    index = json.loads((tmp_path/'index.ipynb').read_text())
    toc = ''.join(''.join(c['source']) for c in index['cells'] if '{toctree}' in ''.join(c['source']))
    for stem in nbs:
        if stem != 'index': assert re.search(rf'^{re.escape(stem)}$', toc, re.M), f'{stem} missing from the toctree'
    mods = sorted(p.stem for p in (ROOT/'videolights').glob('*.py') if not p.name.startswith('_'))
    assert mods and sorted(p.stem for p in (tmp_path/'api').glob('*.md') if p.stem != 'index') == mods
    assert {f'api/{m}' for m in mods} <= set(pages)
    model_api = (tmp_path/'api'/'model.md').read_text()
    assert '.. automodule:: videolights.model' in model_api and '(../07_model.ipynb)' in model_api
    for stem in nbs:                                            # hidden cells go, every figure stays
        src = json.loads((ROOT/'nbs'/f'{stem}.ipynb').read_text())
        staged = json.loads((tmp_path/f'{stem}.ipynb').read_text())
        for c in staged['cells']:
            s = ''.join(c['source'])
            assert not re.match(r'\s*#\|\s*(hide|default_exp)\b', s) and 'nbdev_export(' not in s, (stem, s[:60])
        hidden = [c for c in src['cells'] if c['cell_type'] == 'code'
                  and re.match(r'\s*#\|\s*hide', ''.join(c['source']))]
        assert _pngs(staged) == _pngs(src) - sum(_pngs({'cells': [c]}) for c in hidden), stem
    conf = (ROOT/'docs/conf.py').read_text()
    assert "nb_execution_mode = 'off'" in conf                  # stored outputs are shown, never re-executed


# --- slow: the built site in a real browser -----------------------------------------------------------------------

_PROBE = (b"<script>window.addEventListener('load', () => { const im = [...document.images];"
          b" const ok = im.filter(i => i.complete && i.naturalWidth > 0);"
          b" document.documentElement.setAttribute('data-img-ok', ok.length);"
          b" document.documentElement.setAttribute('data-img-png', ok.filter(i => /\\.png$/.test(i.src)).length);"
          b" document.documentElement.setAttribute('data-img-bad', im.length - ok.length); });</script>")


class _Handler(http.server.SimpleHTTPRequestHandler):
    "Serves the site; HTML pages get a probe that records, after load, how many images decoded."
    def log_message(self, *a): pass
    def send_head(self):
        path = Path(self.translate_path(self.path))
        if path.is_dir(): path = path/'index.html'
        if path.suffix != '.html' or not path.exists(): return super().send_head()
        body = path.read_bytes().replace(b'</body>', _PROBE + b'</body>')
        self.send_response(200)
        self.send_header('Content-Type', 'text/html; charset=utf-8')
        self.send_header('Content-Length', str(len(body)))
        self.end_headers()
        import io
        return io.BytesIO(body)


def _chromium():
    return shutil.which('chromium') or shutil.which('chromium-browser')


@pytest.fixture(scope='module')
def site(tmp_path_factory):
    pytest.importorskip('sphinx')
    pytest.importorskip('myst_nb')
    d = tmp_path_factory.mktemp('docs')
    assert docs.build(d/'site', d/'src') == 0
    srv = http.server.ThreadingHTTPServer(('127.0.0.1', 0), functools.partial(_Handler, directory=str(d/'site')))
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    yield d/'site', f'http://127.0.0.1:{srv.server_address[1]}', d/'src'
    srv.shutdown()


_FLAGS = ['--headless', '--no-sandbox', '--disable-gpu', '--no-first-run', '--disable-background-networking',
          '--disable-component-update', '--disable-sync', '--window-size=1280,900', '--virtual-time-budget=20000']


def _browse(url:str, *extra)->str:
    with tempfile.TemporaryDirectory() as prof:
        r = subprocess.run([_chromium(), *_FLAGS, f'--user-data-dir={prof}', *extra, url],
                           capture_output=True, text=True, timeout=240)
    return r.stdout


def _attr(dom:str, name:str)->int:
    m = re.search(rf'{name}="(\d+)"', dom)
    assert m, f'probe attribute {name} not found: the page did not finish loading'
    return int(m[1])


@pytest.mark.slow
@pytest.mark.parametrize('page', ['index', '07_model', '10_loss', '12_visualize'])
def test_pages_render_with_their_figures(site, page):
    if _chromium() is None: pytest.skip('chromium not installed (apt-get install -y chromium)')
    root, url, src = site
    expected = _pngs(json.loads((src/f'{page}.ipynb').read_text()))     # the figures stored in the notebook
    assert expected >= 1, f'{page}: no figure stored in the notebook'
    assert len(re.findall(r'<img [^>]*src="_images/[^"]+\.png"', (root/f'{page}.html').read_text())) == expected
    dom = _browse(f'{url}/{page}.html', '--dump-dom')
    assert _attr(dom, 'data-img-bad') == 0
    assert _attr(dom, 'data-img-png') == expected              # every figure decoded in the browser
    cells = json.loads((ROOT/'nbs'/f'{page}.ipynb').read_text())['cells']
    heading = next(l for c in cells if c['cell_type'] == 'markdown'
                   for l in ''.join(c['source']).splitlines() if l.startswith('# '))[2:].strip()
    assert re.sub(r'[`*]', '', heading).split()[0] in dom       # the notebook's title is the page's heading


@pytest.mark.slow
def test_search_and_api_reference(site, tmp_path):
    if _chromium() is None: pytest.skip('chromium not installed (apt-get install -y chromium)')
    root, url, _ = site
    dom = _browse(f'{url}/search.html?q=generalized_temporal_iou', '--dump-dom')
    assert 'api/spans.html' in dom                              # the search index finds the API entry
    api = _browse(f'{url}/api/spans.html', '--dump-dom')
    assert 'generalized_temporal_iou' in api and '(N, M) GIoU' in api     # signature and docments comment
    shot = tmp_path/'index.png'
    _browse(f'{url}/index.html', f'--screenshot={shot}')
    import matplotlib.image as mpimg
    img = mpimg.imread(shot)
    assert img.shape[0] >= 600 and img.std() > 0.05             # a rendered page, not a blank one


_NBDEV_PROC = """import sys
from pathlib import Path
from nbdev.processors import FilterDefaults
from nbdev.serve_drv import main
main((Path(sys.argv[1]), Path(sys.argv[2]), FilterDefaults))
"""


@pytest.mark.slow
def test_nbdev_docs_preprocessing(tmp_path):
    """`nbdev_docs` (for users with Quarto) runs nbdev's processors on every notebook before Quarto renders it; they
    execute each cell that holds an import on its own, so a lesson cell mixing imports with code breaks the build."""
    import sys
    failed = {}
    for nb in sorted(p for p in (ROOT/'nbs').glob('*.ipynb') if not p.name.startswith('_')):
        r = subprocess.run([sys.executable, '-c', _NBDEV_PROC, str(nb), str(tmp_path/nb.name)], cwd=nb.parent,
                           capture_output=True, text=True, timeout=600)
        if r.returncode: failed[nb.name] = [l for l in r.stderr.splitlines() if re.match(r'\w*(Error|Exception)\b', l)]
        else: assert (tmp_path/nb.name).exists()
    assert not failed, failed
