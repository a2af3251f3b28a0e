"""Tests of videolights.app beyond the notebook: the page's widgets driven from Python against the predictor, uploads,
the submission page, the command's checks, and (slow) `videolights app` served by Voilà and driven in headless
Chromium, whose screenshot goes to figures/app.png."""
import base64, datetime, html, json, os, re, shutil, signal, socket, subprocess, sys, time
import urllib.request
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import matplotlib
matplotlib.use('Agg')
import matplotlib.pyplot as plt
import torch

from videolights import app as A
from videolights.config import get_preset
from videolights.model import build_model
from videolights.train import save_checkpoint, config_dict
from videolights.visualize import load_jsonl_records

pytest.importorskip('av', reason='PyAV is needed to decode videos (pip install -e ".[app]")')
pytest.importorskip('transformers', reason='transformers is needed for the encoders (pip install -e ".[app]")')
from videolights.video import CLIPEncoder, VideoLightsPredictor, make_tiny_clip, make_test_video

ROOT = Path(__file__).resolve().parents[1]
GT = ROOT/'data/qvhighlights/highlight_val_release.jsonl'
PREDS = ROOT/'data/qvhighlights/official_examples/sample_val_preds.jsonl'
QUERIES = ['a dog runs on the beach', 'the man and the woman in the car', 'a cat jumps']


@pytest.fixture(scope='module')
def tiny(tmp_path_factory):
    "A tiny random CLIP, a tiny random model checkpoint in a run folder (16-clip window) and a 40-s synthetic video."
    d = tmp_path_factory.mktemp('app')
    clip = make_tiny_clip(d/'clip')
    enc = CLIPEncoder(clip)
    cfg = get_preset('tiny', v_feat_types=('clip',), v_feat_dims=(enc.video_dim,), t_feat_types=('clip',),
                     t_feat_dims=(enc.text_dim,), max_v_l=16, max_q_l=32)
    torch.manual_seed(0)
    save_checkpoint(dict(model=build_model(cfg).state_dict(), config=config_dict(cfg)), d/'run'/'model_best.ckpt')
    (d/'videos').mkdir()
    video = make_test_video(d/'videos'/'street.mp4', duration=40, fps=2, size=(64, 48))
    return SimpleNamespace(dir=d, clip=clip, run=d/'run', videos=d/'videos', video=video, cfg=cfg)


@pytest.fixture(scope='module')
def page(tiny):
    return A.build_app(ckpt=tiny.run, videos=tiny.videos, sources={'clip': str(tiny.clip)}, upload_dir=tiny.dir/'up')


def _cells(table_html:str)->list[list[str]]:
    return [re.findall(r'<td>(.*?)</td>', r) for r in re.findall(r'<tr>(.*?)</tr>', table_html)[1:]]


def test_page_shows_what_the_predictor_finds(tiny, page):
    c = page.pages['find'].controls
    assert page.tabs.selected_index == 0 and Path(c['video'].value) == tiny.video
    c['queries'].value = '\n'.join(QUERIES)
    c['go'].click()
    assert c['status'].value == '3 queries on street.mp4'
    want = VideoLightsPredictor.from_pretrained(tiny.run, sources={'clip': str(tiny.clip)}).predict(QUERIES, tiny.video)
    rows = _cells(c['table'].value)
    assert [r[0] for r in rows] == QUERIES
    for r, p in zip(rows, want):      # the table is the predictor's top-3, in order
        assert r[1:] == [f'{s:.1f}–{e:.1f} s &nbsp;({sc:.2f})' for s, e, sc in p.windows[:3]]
    # the timeline holds the colour of each typed query and of no other row
    px = A.png_pixels(c['timeline'].value)
    shares = [A.color_share(px, col) for col in A.QUERY_COLORS[:5]]
    assert min(shares[:3]) > 0.003 and max(shares[3:]) == 0, shares
    assert [q for _, q in c['query'].options] == [0, 1, 2] and c['query'].value == 0
    plt.close('all')


def test_detail_controls_redraw(tiny, page):
    c = page.pages['find'].controls
    if not c['query'].options:
        c['queries'].value = '\n'.join(QUERIES)
        c['go'].click()
    c['query'].value, c['attn'].value, c['layer'].value, c['head'].value = 0, 'dec.cross', 0, -1
    app = page.pages['find'].app
    fig = app.detail(0, 'dec.cross', 0, None)
    assert fig.axes[5].get_title() == 'dec.cross layer 0 head mean'
    with_attn = bytes(c['detail'].value)
    assert A.png_pixels(with_attn).shape == A.png_pixels(A._png(fig)).shape    # the widget shows that figure
    c['head'].value = 1
    assert bytes(c['detail'].value) != with_attn
    c['attn'].value = '(none)'
    assert A.png_pixels(c['detail'].value).shape[0] < A.png_pixels(with_attn).shape[0]
    assert set(c['attn'].options) >= {'(none)', 'enc.self', 'dec.self', 'dec.cross'}
    c['attn'].value = 'enc.self'
    assert A.png_pixels(c['detail'].value).shape[0] == A.png_pixels(with_attn).shape[0]
    plt.close('all')


def test_window_outputs_are_the_prediction_inputs(tiny):
    "On a video that fits one window, the attention run's saliency equals the prediction's."
    pr = VideoLightsPredictor.from_pretrained(tiny.run, sources={'clip': str(tiny.clip)})
    v20 = make_test_video(tiny.dir/'v20.mp4', duration=20, fps=2, size=(64, 48))
    ev = pr.encode_video(v20)
    p = pr.predict(QUERIES[1], ev)
    o, start = A.window_outputs(pr, QUERIES[1], ev, clip=7)
    assert start == 0 and o['saliency_scores'].shape == (1, 10)
    np.testing.assert_allclose(o['saliency_scores'][0].numpy(), p.saliency, atol=1e-5)
    prob = o['pred_logits'][0].softmax(-1)[:, 0].numpy()
    np.testing.assert_allclose(np.sort(prob)[::-1][:3], np.sort(p.windows[:, 2])[::-1][:3], atol=1e-4)
    # on the 40-s video (two windows: clips 0-15 and 4-19) a late clip picks the second window
    assert A.window_outputs(pr, QUERIES[1], pr.encode_video(tiny.video), clip=17)[1] == 4


def _file(name, data):
    return dict(name=name, type='', size=len(data), content=memoryview(data),
                last_modified=datetime.datetime.fromtimestamp(0, datetime.timezone.utc))


def test_uploads_and_bad_input(tiny):
    ui = A.MomentsApp(VideoLightsPredictor.from_pretrained(tiny.run, sources={'clip': str(tiny.clip)}),
                      tiny.videos, tiny.dir/'uploads').widget()
    c = ui.controls
    c['upload'].value = (_file('../../x/My Talk (2).MP4', tiny.video.read_bytes()),)
    got = Path(c['video'].value)
    assert got == tiny.dir/'uploads'/'My_Talk_2_.MP4' and got.read_bytes() == tiny.video.read_bytes()
    assert c['status'].value == 'uploaded My_Talk_2_.MP4' and str(tiny.video) in c['video'].options
    c['queries'].value = 'a cat'
    c['go'].click()
    assert c['status'].value == '1 query on My_Talk_2_.MP4'
    c['upload'].value = (_file('run.sh', b'rm -rf /'),)
    assert c['status'].value.startswith('error: run.sh: not a .mp4') and not (tiny.dir/'uploads'/'run.sh').exists()
    (tiny.dir/'uploads'/'fake.mp4').write_text('not a video')
    for video, queries, msg in [(str(tiny.video), '  \n', 'error: type at least one query'),
                                ('', 'a cat', "error: no video file at ''"),
                                (str(tiny.dir/'uploads'/'fake.mp4'), 'a cat', 'error: ')]:
        c['video'].value, c['queries'].value = video, queries
        c['go'].click()
        assert html.unescape(c['status'].value).startswith(msg), c['status'].value
        assert c['table'].value == '' and c['query'].options == () and len(c['timeline'].value) == 0


def test_submission_page(tmp_path):
    sp = A.submission_page(str(PREDS), str(GT), upload_dir=tmp_path)
    s = sp.controls
    inner = s['body'].children[0].controls          # opened at once
    n = len(load_jsonl_records(PREDS))
    assert s['status'].value == f'{n} queries' and len(inner['select'].options) == n
    assert 'top1 IoU' in inner['info'].value           # ground truth joined: per-query metrics shown
    s['gt'].value = str(tmp_path/'nope.jsonl')
    s['open'].click()
    assert s['status'].value.startswith('error: ') and s['body'].children == ()
    recs = load_jsonl_records(PREDS)[:7]
    s['gt'].value = ''
    s['upload'].value = (_file('my preds.jsonl', ''.join(json.dumps(r) + '\n' for r in recs).encode()),)
    assert s['submission'].value == str(tmp_path/'my_preds.jsonl') and s['status'].value == '7 queries'
    assert 'top1 IoU' not in s['body'].children[0].controls['info'].value
    plt.close('all')


def test_page_without_a_checkpoint(tiny, tmp_path):
    ui = A.build_app()
    assert ui.tabs.selected_index == 1 and '--ckpt' in ui.pages['find'].value
    assert ui.pages['explore'].controls['body'].children == ()
    # a run folder with predictions opens in the explorer (and still finds moments)
    run = tmp_path/'run'
    shutil.copytree(tiny.run, run)
    shutil.copy(PREDS, run/'best_val_preds.jsonl')
    ui = A.build_app(ckpt=run, sources={'clip': str(tiny.clip)})
    assert ui.tabs.selected_index == 0 and ui.pages['explore'].controls['submission'].value == str(run)
    assert ui.pages['explore'].controls['status'].value == f'{len(load_jsonl_records(PREDS))} queries'
    plt.close('all')


def test_app_command_checks_before_serving(tiny, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, 'voila', None)               # the extra is missing
    assert A.app_main(['--ckpt', str(tiny.run)]) == 1
    err = capsys.readouterr().err
    assert err.count('\n') == 1 and err.startswith('videolights app: error: ') and 'pip install -e ".[app]"' in err
    monkeypatch.setattr(A, 'require_app', lambda: None)           # past the extra: the paths and the checkpoint
    bad = tmp_path/'bad.ckpt'
    bad.write_bytes(b'not a checkpoint')
    for argv, msg in [(['--ckpt', str(tmp_path/'nope')], f"--ckpt: {tmp_path/'nope'} does not exist"),
                      (['--submission', str(tmp_path/'p.jsonl')], '--submission: '),
                      (['--videos', str(tmp_path/'vids')], '--videos: '),
                      (['--ckpt', str(bad)], 'not a PyTorch checkpoint'),
                      (['--ckpt', str(tiny.run), '--clip-model', str(tmp_path/'no_clip')], 'no_clip')]:
        assert A.app_main(argv) == 2
        err = capsys.readouterr().err
        assert err.startswith('videolights app: error: ') and msg in err.splitlines()[0], err


def test_app_notebook_builds_the_page(tiny, tmp_path):
    kw = dict(ckpt=str(tiny.run), videos=str(tiny.videos), submission=None, gt=None,
              sources={'clip': str(tiny.clip), 'blip': None, 'slowfast': None}, device='cpu',
              upload_dir=str(tmp_path/'up'))
    import nbformat
    nb = nbformat.read(A.app_notebook(kw, tmp_path/'app.ipynb'), as_version=4)
    assert len(nb.cells) == 1 and nb.metadata.kernelspec.name == 'python3'
    ns = {}
    exec(compile(nb.cells[0].source.replace('build_app(', 'ui = build_app(', 1), 'app', 'exec'), ns)
    assert Path(ns['ui'].pages['find'].controls['video'].value) == tiny.video
    assert ns['ui'].pages['find'].app.upload_dir == tmp_path/'up'


# ---- slow: the real server in a real browser -------------------------------------------------------------------

class _Chrome:
    "Just enough of the Chrome DevTools Protocol (over websocket-client, a Jupyter server dependency) to drive a page."
    FLAGS = ['--headless', '--no-sandbox', '--disable-gpu', '--no-first-run', '--disable-background-networking',
             '--disable-component-update', '--disable-sync', '--hide-scrollbars']

    def __init__(self, exe, profile, size=(1100, 1600)):
        import websocket
        port = _free_port()
        self.proc = subprocess.Popen([exe, *self.FLAGS, f'--remote-debugging-port={port}',
                                      f'--window-size={size[0]},{size[1]}',
                                      f'--user-data-dir={profile}', 'about:blank'],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        tabs = _retry(lambda: json.load(urllib.request.urlopen(f'http://127.0.0.1:{port}/json')), 30)
        ws_url = next(t['webSocketDebuggerUrl'] for t in tabs if t['type'] == 'page')
        self.ws, self.n, self.events = websocket.create_connection(ws_url, suppress_origin=True, timeout=120), 0, []

    def call(self, method, **params):
        self.n += 1
        self.ws.send(json.dumps(dict(id=self.n, method=method, params=params)))
        while True:
            m = json.loads(self.ws.recv())
            if 'method' in m: self.events.append(m)
            if m.get('id') == self.n:
                if 'error' in m: raise RuntimeError(f'{method}: {m["error"]}')
                return m['result']

    def event(self, method, timeout=30):
        "The first event `method` received (waiting for it)."
        def got():
            self.js('0')   # a round trip reads the events that arrived meanwhile
            return next((e['params'] for e in self.events if e['method'] == method), None)
        return _retry(got, timeout, what=method)

    def js(self, expr):
        r = self.call('Runtime.evaluate', expression=expr, returnByValue=True, awaitPromise=True, userGesture=True)
        if 'exceptionDetails' in r: raise RuntimeError(f'{expr}: {r["exceptionDetails"]}')
        return r['result'].get('value')

    def wait(self, expr, timeout=180):
        return _retry(lambda: self.js(expr) or None, timeout, what=expr)

    def close(self):
        self.ws.close()
        self.proc.terminate()
        self.proc.wait(10)


def _free_port()->int:
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


def _retry(fn, timeout, what='', every=0.25):
    t0, last = time.time(), None
    while time.time() - t0 < timeout:
        try:
            v = fn()
            if v is not None: return v
        except Exception as e: last = e
        time.sleep(every)
    raise TimeoutError(f'gave up after {timeout} s waiting for {what or fn}: {last}')


@pytest.mark.slow
def test_app_in_headless_chromium(tiny, tmp_path):
    """Start `videolights app` on a loopback port with the tiny model and encoder, open it in headless Chromium, type
    two queries, press the button, and check the DOM (table, figures, controls) and the screenshot's pixels (each
    query's colour on the timeline image, no third colour). Needs Debian's `chromium` and the app extra."""
    exe = shutil.which('chromium') or shutil.which('chromium-browser')
    if exe is None: pytest.skip('chromium not installed (apt-get install -y chromium)')
    pytest.importorskip('voila', reason='the app extra is not installed (pip install -e ".[app]")')
    log = tmp_path/'app.log'
    env = dict(os.environ, OMP_NUM_THREADS='1', MPLBACKEND='Agg')
    server = subprocess.Popen([sys.executable, '-m', 'videolights', 'app', '--ckpt', str(tiny.run), '--clip-model',
                               str(tiny.clip), '--videos', str(tiny.videos), '--host', '127.0.0.1',
                               '--port', str(_free_port()), '--device', 'cpu'],
                              stdout=log.open('w'), stderr=subprocess.STDOUT, env=env, start_new_session=True)
    chrome = None
    try:
        def url():
            if server.poll() is not None: raise AssertionError(f'videolights app exited:\n{log.read_text()}')
            m = re.search(r'Voilà is running at:\s*(http://127\.0\.0\.1:\d+/)', log.read_text())
            return m and m[1]
        base = _retry(url, 120, 'the server to start')
        assert 'videolights app: VideoLightsPredictor(' in log.read_text()   # the checkpoint was checked first
        chrome = _Chrome(exe, tmp_path/'chrome')
        chrome.call('Network.enable')
        chrome.call('Page.navigate', url=base)
        chrome.wait("!!document.querySelector('.widget-textarea textarea')")         # kernel up, page built
        assert chrome.js("document.querySelector('input[list]').value") == str(tiny.video)
        up = tmp_path/'my upload.mp4'
        shutil.copy(tiny.video, up)                    # upload a video through the page
        chrome.call('Page.enable')
        chrome.call('Page.setInterceptFileChooserDialog', enabled=True)
        button = "[...document.querySelectorAll('button')].find(b => b.textContent.includes('{}'))"
        chrome.js(button.format('upload a video') + '.click()')
        chooser = chrome.event('Page.fileChooserOpened')
        chrome.call('DOM.setFileInputFiles', files=[str(up)], backendNodeId=chooser['backendNodeId'])
        chrome.wait("document.body.innerText.includes('uploaded my_upload.mp4')")
        assert chrome.js("document.querySelector('input[list]').value").endswith('/uploads/my_upload.mp4')
        chrome.js("document.querySelector('.widget-textarea textarea').focus()")
        chrome.call('Input.insertText', text='\n'.join(QUERIES[:2]))                 # typed, as a person would
        chrome.js(button.format('Find moments') + '.click()')
        status = chrome.wait("(t => t && t.includes('queries on') && t)(document.body.innerText)")
        assert '2 queries on my_upload.mp4' in status
        chrome.wait("document.querySelectorAll('img.widget-image').length == 2 && "
                    "[...document.querySelectorAll('img.widget-image')].every(i => i.complete && i.naturalWidth > 300)")
        table = chrome.js("document.querySelector('table.vl-moments').innerText")
        assert QUERIES[0] in table and QUERIES[1] in table and QUERIES[2] not in table
        assert chrome.js("[...document.querySelectorAll('.widget-dropdown select')].map(s => s.value).join('|')"
                         ).count('dec.cross') == 1
        rect = chrome.js("(r => [r.x, r.y, r.width, r.height])("
                         "document.querySelectorAll('img.widget-image')[0].getBoundingClientRect())")
        png = base64.b64decode(chrome.call('Page.captureScreenshot', format='png')['data'])
        shot = ROOT/'figures'/'app.png'
        shot.parent.mkdir(exist_ok=True)
        shot.write_bytes(png)
        px = A.png_pixels(png)
        x, y, w, h = (int(round(v)) for v in rect)
        timeline = px[y:y + h, x:x + w]
        assert timeline.shape[0] > 100 and timeline.shape[1] > 500
        shares = [A.color_share(timeline, col, tol=6) for col in A.QUERY_COLORS[:3]]
        assert shares[0] > 0.01 and shares[1] > 0.01 and shares[2] == 0, shares
        assert A.color_share(px[:y], A.QUERY_COLORS[0], tol=6) < 0.001                # above it: the controls only
        # offline: every script and widget asset came from the app's server; the only other requests are the two
        # icon stylesheets of Voilà's page template (cosmetic; the page works without them)
        urls = {e['params']['request']['url'] for e in chrome.events if e['method'] == 'Network.requestWillBeSent'}
        scripts = [u for u in urls if u.startswith(base) and u.split('?')[0].endswith('.js')]
        assert any('jupyter-widgets' in u or 'jupyterlab-manager' in u or 'widgets-manager' in u for u in scripts), urls
        other = sorted(u for u in urls if not u.startswith((base, 'data:', 'blob:')))
        icons = r'https://cdn\.jsdelivr\.net/npm/@fortawesome/fontawesome-free@(\^|%5E)5/css/[\w.-]+\.css$'
        assert all(re.match(icons, u) for u in other), other
    finally:
        if chrome is not None: chrome.close()
        os.killpg(server.pid, signal.SIGTERM)
        try: server.wait(30)
        except subprocess.TimeoutExpired: os.killpg(server.pid, signal.SIGKILL)
