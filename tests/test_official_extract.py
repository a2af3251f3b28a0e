"""Side by side with the official extractors (slow; skipped unless the official checkout and HERO's are given).

VIDEOLIGHTS_OFFICIAL: the official VideoLights checkout; VIDEOLIGHTS_HERO: a HERO_Video_Feature_Extractor checkout;
VIDEOLIGHTS_OFFICIAL_PY: the interpreter of the official environment (see tools/check_official_extract.py for what it
needs; `ffmpeg` and `ffprobe` on PATH)."""
import json, os, shutil, subprocess, sys
from pathlib import Path
import pytest

OFFICIAL, HERO = os.environ.get('VIDEOLIGHTS_OFFICIAL'), os.environ.get('VIDEOLIGHTS_HERO')
TOOL = Path(__file__).resolve().parents[1] / 'tools' / 'check_official_extract.py'


@pytest.mark.slow
@pytest.mark.skipif(not (OFFICIAL and (Path(OFFICIAL) / 'extract_feature').is_dir()),
                    reason='set VIDEOLIGHTS_OFFICIAL to the official checkout (extract_feature/)')
@pytest.mark.skipif(not (HERO and (Path(HERO) / 'slowfast' / 'extract_feature').is_dir()),
                    reason='set VIDEOLIGHTS_HERO to a HERO_Video_Feature_Extractor checkout')
@pytest.mark.skipif(shutil.which('ffprobe') is None, reason='the official readers call ffmpeg/ffprobe')
def test_features_equal_official_extractors(tmp_path):
    "SlowFast (HERO + PySlowFast .pkl) and CLIP (official ClipFeatureExtractor): same features, per clip and token."
    out = tmp_path / 'rows.json'
    r = subprocess.run([sys.executable, str(TOOL), '--sf-width', '8', '--seconds', '5.3', '--json', str(out)],
                       capture_output=True, text=True)
    print(r.stdout[-3000:], r.stderr[-3000:])
    assert r.returncode == 0
    rows = {x['name']: x for x in json.loads(out.read_text())}
    assert set(rows) == {'slowfast video', 'clip video', 'clip text q0', 'clip text q1', 'clip text q2'}
    assert rows['slowfast video']['shape'] == '(3, 288)' and rows['clip video']['shape'] == '(3, 32)'
    assert all(x['min_cos'] > 0.99999 for x in rows.values())
