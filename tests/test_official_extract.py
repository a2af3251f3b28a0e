"""Side by side with the official extractors (slow; skipped unless the checkouts they need are given).

VIDEOLIGHTS_OFFICIAL: the official VideoLights checkout; VIDEOLIGHTS_HERO: a HERO_Video_Feature_Extractor checkout
(SlowFast); VIDEOLIGHTS_LAVIS: a salesforce/LAVIS checkout (BLIP-2); VIDEOLIGHTS_OFFICIAL_PY: the interpreter of the
official environment (see tools/check_official_extract.py for what it needs; `ffmpeg` and `ffprobe` on PATH)."""
import json, os, shutil, subprocess, sys
from pathlib import Path
import pytest

OFFICIAL, HERO = os.environ.get('VIDEOLIGHTS_OFFICIAL'), os.environ.get('VIDEOLIGHTS_HERO')
LAVIS = os.environ.get('VIDEOLIGHTS_LAVIS')
TOOL = Path(__file__).resolve().parents[1] / 'tools' / 'check_official_extract.py'
needs_official = pytest.mark.skipif(not (OFFICIAL and (Path(OFFICIAL) / 'extract_feature').is_dir()),
                                    reason='set VIDEOLIGHTS_OFFICIAL to the official checkout (extract_feature/)')
needs_ffprobe = pytest.mark.skipif(shutil.which('ffprobe') is None, reason='the official readers call ffmpeg/ffprobe')


def _run_tool(tmp_path, *args):
    out = tmp_path / 'rows.json'
    r = subprocess.run([sys.executable, str(TOOL), '--seconds', '5.3', '--json', str(out), *args],
                       capture_output=True, text=True)
    print(r.stdout[-3000:], r.stderr[-3000:])
    assert r.returncode == 0
    return {x['name']: x for x in json.loads(out.read_text())}


@pytest.mark.slow
@needs_official
@pytest.mark.skipif(not (HERO and (Path(HERO) / 'slowfast' / 'extract_feature').is_dir()),
                    reason='set VIDEOLIGHTS_HERO to a HERO_Video_Feature_Extractor checkout')
@needs_ffprobe
def test_features_equal_official_extractors(tmp_path):
    "SlowFast (HERO + PySlowFast .pkl) and CLIP (official ClipFeatureExtractor): same features, per clip and token."
    rows = _run_tool(tmp_path, '--sf-width', '8', '--encoders', 'slowfast,clip')
    assert set(rows) == {'slowfast video', 'clip video', 'clip text q0', 'clip text q1', 'clip text q2'}
    assert rows['slowfast video']['shape'] == '(3, 288)' and rows['clip video']['shape'] == '(3, 32)'
    assert all(x['min_cos'] > 0.99999 for x in rows.values())


@pytest.mark.slow
@needs_official
@pytest.mark.skipif(not (LAVIS and (Path(LAVIS) / 'lavis' / 'models' / 'blip2_models').is_dir()),
                    reason='set VIDEOLIGHTS_LAVIS to a salesforce/LAVIS checkout (lavis/)')
@needs_ffprobe
def test_blip2_features_equal_official_extractor(tmp_path):
    "BLIP-2 (official extract_query_blip_features_qvhl.py + LAVIS blip2_feature_extractor): same float32 features."
    rows = _run_tool(tmp_path, '--encoders', 'blip')
    assert set(rows) == {'blip video', 'blip text q0', 'blip text q1', 'blip text q2'}  # no 'blip weights' row: all set
    assert rows['blip video']['shape'] == '(3, 64)'  # first query output per clip, unprojected
    assert rows['blip text q0']['shape'] == '(12, 64)'  # [CLS] a man in a red hat open ##s the door [SEP]
    assert all(x['max_diff'] <= 1e-5 * x['scale'] and x['min_cos'] > 0.99999 for x in rows.values())
