"""End-to-end tests of `videolights.video`: decoding, extraction CLI, predictor, bad input. Offline: synthetic videos,
tiny randomly initialised encoders saved with `save_pretrained` and loaded back through `from_pretrained`."""
import json, math
from fractions import Fraction
from pathlib import Path
import numpy as np
import pytest
import torch

av = pytest.importorskip('av')
pytest.importorskip('transformers')
import h5py
from videolights import video as V
from videolights.cli import main as cli_main
from videolights.config import get_preset
from videolights.model import build_model
from videolights.train import save_checkpoint, config_dict
from videolights.data import open_features, load_video_feats


@pytest.fixture(scope='module')
def enc_dirs(tmp_path_factory):
    d = tmp_path_factory.mktemp('enc')
    return dict(clip=V.make_tiny_clip(d / 'clip'), blip=V.make_tiny_blip2(d / 'blip'))


@pytest.fixture(scope='module')
def encoders(enc_dirs):
    return dict(clip=V.CLIPEncoder(enc_dirs['clip']), blip=V.BLIP2Encoder(enc_dirs['blip']))


def _cfg(**kw):
    base = dict(v_feat_types=('clip', 'blip'), v_feat_dims=(8, 24), t_feat_types=('clip', 'blip'), t_feat_dims=(16, 24),
                blip_features=True, blip_dim=24, max_v_l=16, max_q_l=32)
    return get_preset('tiny', **{**base, **kw})


@pytest.fixture(scope='module')
def run_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp('run')
    torch.manual_seed(0)
    cfg = _cfg()
    save_checkpoint(dict(model=build_model(cfg).state_dict(), config=config_dict(cfg)), d / 'model_best.ckpt')
    return d


# --- decoding -------------------------------------------------------------------------------------------------------

def _last_before(frame_t, bounds):
    "Brute force of FFmpeg's fps filter: the last frame strictly before each slot boundary (the first frame if none)."
    return [max(0, int(np.sum(frame_t < b)) - 1) for b in bounds]


def _ffmpeg_fps(path, rate):
    "Frame indices that libavfilter's real fps filter outputs (through PyAV)."
    with av.open(str(path)) as c:
        s = c.streams.video[0]
        g = av.filter.Graph()
        src, f, sink = g.add_buffer(template=s), g.add('fps', f'fps={rate}'), g.add('buffersink')
        src.link_to(f)
        f.link_to(sink)
        g.configure()
        out = []
        for fr in [*c.decode(s), None]:
            g.push(fr)
            while True:
                try: out.append(int(V.frame_index_of(V.resize_crop(g.pull(), 16))))
                except (av.error.BlockingIOError, av.error.EOFError): break
    return out


@pytest.mark.parametrize('duration,fps,clip_len', [(10, 5, 2.), (45, 3, 2.), (150, 2, 2.), (151, 1, 2.), (37, 4, 1.),
                                                   (10.8, 5, 2.), (11.2, 5, 2.), (20, 29.97, 2.), (600, 1, 2.)])
def test_clip_counts_and_timestamps(tmp_path, duration, fps, clip_len):
    p = V.make_test_video(tmp_path / 'v.mp4', duration, fps, size=(32, 24))
    clips = list(V.sample_clip_frames(p, clip_len, k=1, size=16))
    n = max(1, math.floor(duration / clip_len + 0.5))
    assert len(clips) == n == V.n_clips_of(duration, clip_len)
    assert [c.clip_id for c in clips] == list(range(n))
    frame_t = np.array([float(i / Fraction(fps).limit_denominator(1000)) for i in range(int(round(duration * fps)))])
    want = _last_before(frame_t, (np.arange(n) + 0.5) * clip_len)
    got = V.frame_index_of(np.concatenate([c.frames for c in clips]))
    assert got.tolist() == want
    np.testing.assert_allclose(np.concatenate([c.times for c in clips]), frame_t[want], atol=1e-6)
    if duration <= 60: assert got.tolist() == _ffmpeg_fps(p, f'1/{clip_len:g}')  # the official extractors' filter


@pytest.mark.parametrize('k', [4, 6, 32])
def test_dense_sampling_matches_ffmpeg(tmp_path, k):
    p = V.make_test_video(tmp_path / 'v.mp4', 7, 8, size=(32, 24))  # 56 frames every 0.125 s
    clips = list(V.sample_clip_frames(p, 2., k=k, size=16))
    assert len(clips) == 4 and all(c.frames.shape == (k, 16, 16, 3) for c in clips)
    got = V.frame_index_of(np.concatenate([c.frames for c in clips])).tolist()
    frame_t = np.arange(56) / 8
    assert got == _last_before(frame_t, (np.arange(4 * k) + 0.5) * 2. / k)
    ff = _ffmpeg_fps(p, f'{k}/2')
    assert got[:len(ff)] == ff[:len(got)]  # FFmpeg may stop a few slots earlier at the end; we repeat the last frame


def _half_video(path, w, h, vertical=False):
    "One 2-s video whose frames are dark in the first half (columns, or rows if vertical) and bright in the second."
    with av.open(str(path), 'w') as c:
        s = c.add_stream('mpeg4', rate=2)
        s.width, s.height, s.pix_fmt = w, h, 'yuv420p'
        a = np.zeros((h, w, 3), np.uint8)
        if vertical: a[h // 2:] = 255
        else: a[:, w // 2:] = 255
        for _ in range(4):
            for pk in s.encode(av.VideoFrame.from_ndarray(a, format='rgb24')): c.mux(pk)
        for pk in s.encode(): c.mux(pk)
    return path


@pytest.mark.parametrize('w,h,vertical', [(128, 48, False), (48, 128, True), (64, 64, False)])
def test_resize_crop_is_centred(tmp_path, w, h, vertical):
    p = _half_video(tmp_path / 'v.mp4', w, h, vertical)
    f = next(V.sample_clip_frames(p, 2., size=24)).frames[0].astype(float)  # (24, 24, 3)
    assert f.shape == (24, 24, 3)
    a = f.transpose(1, 0, 2) if vertical else f  # the split runs along axis 1
    assert a[:, :10].mean() < 40 and a[:, 14:].mean() > 215  # the split sits in the middle of the crop


def _textured(path, w, h, n=12, fps=5):
    yy, xx = np.mgrid[0:h, 0:w]
    with av.open(str(path), 'w') as c:
        s = c.add_stream('mpeg4', rate=fps)
        s.width, s.height, s.pix_fmt, s.bit_rate = w, h, 'yuv420p', 4_000_000
        for k in range(n):
            a = np.stack([128 + 100 * np.sin(xx / 7 + k) * np.cos(yy / 5), xx * 255 / w, yy * 255 / h],
                         -1).astype(np.uint8)
            for pk in s.encode(av.VideoFrame.from_ndarray(a, format='rgb24')): c.mux(pk)
        for pk in s.encode(): c.mux(pk)
    return path


@pytest.mark.parametrize('w,h,size', [(320, 180, 224), (180, 320, 224), (640, 480, 224), (96, 64, 32)])
def test_pixels_equal_official_ffmpeg_chain(tmp_path, w, h, size):
    "Our frames equal the official extractors' ffmpeg chain fps=1/c, scale (short side, bicubic), centre crop, rgb24."
    p = _textured(tmp_path / 'v.mp4', w, h)
    nw, nh = (size, int(h * size / w)) if h >= w else (int(w * size / h), size)
    # the ffmpeg CLI's rgb24 output converts inside the graph
    chain = (f'fps=fps=1/2,scale={nw}:{nh}:flags=bicubic,crop={size}:{size}:'
             f'{int((nw - size) / 2)}:{int((nh - size) / 2)},format=rgb24')
    with av.open(str(p)) as c:
        s = c.streams.video[0]
        g = av.filter.Graph()
        nodes = [g.add_buffer(template=s)] + [g.add(*f.split('=', 1)) for f in chain.split(',')] + [g.add('buffersink')]
        for a, b in zip(nodes, nodes[1:]): a.link_to(b)
        g.configure()
        ref = []
        for fr in [*c.decode(s), None]:
            g.push(fr)
            while True:
                try: ref.append(g.pull().to_ndarray())
                except (av.error.BlockingIOError, av.error.EOFError): break
    ours = np.stack([c.frames[0] for c in V.sample_clip_frames(p, 2., 1, size)])
    assert ours.shape == (len(ref), size, size, 3)
    assert np.array_equal(ours, np.stack(ref))


# --- bad input ------------------------------------------------------------------------------------------------------

def _no_frames_video(path):
    "An AVI whose video stream has no frames (an mp4 without frames has no stream at all)."
    with av.open(str(path), 'w') as c:
        s = c.add_stream('mpeg4', rate=5)
        s.width, s.height, s.pix_fmt = 32, 24, 'yuv420p'
        c.start_encoding()
    return path


def _audio_only(path):
    with av.open(str(path), 'w') as c:
        s = c.add_stream('pcm_s16le', rate=8000)
        s.layout = 'mono'
        fr = av.AudioFrame.from_ndarray(np.zeros((1, 8000), np.int16), format='s16', layout='mono')
        fr.sample_rate = 8000
        for pk in s.encode(fr): c.mux(pk)
        for pk in s.encode(): c.mux(pk)
    return path


def test_bad_videos(tmp_path):
    (tmp_path / 'empty.mp4').write_bytes(b'')
    (tmp_path / 'junk.mp4').write_bytes(b'\x00garbage' * 500)
    with pytest.raises(V.VideoError, match='empty file'): V.probe_video(tmp_path / 'empty.mp4')
    with pytest.raises(V.VideoError, match='unreadable'): V.probe_video(tmp_path / 'junk.mp4')
    with pytest.raises(V.VideoError, match='no such file'): V.probe_video(tmp_path / 'nope.mp4')
    with pytest.raises(V.VideoError, match='no video stream'): V.probe_video(_audio_only(tmp_path / 'a.wav'))
    nf = _no_frames_video(tmp_path / 'noframes.avi')
    with pytest.raises(V.VideoError, match=r'noframes.avi: zero-length video'): V.probe_video(nf)
    with pytest.raises(V.VideoError, match=r'noframes.avi: the video stream has no decodable frames'):
        list(V.sample_clip_frames(nf))


# --- official formats and samplers --------------------------------------------------------------------------------

def test_slowfast_checkpoint_formats(tmp_path):
    "Caffe2 .pkl (as released) and PyTorch checkpoints load the same weights; bad files fail naming the problem."
    pkl = V.make_tiny_slowfast(tmp_path / 'sf.pkl', width=8, depths=(1, 2, 1, 1), seed=3)
    sd, kw = V.slowfast_state_dict(pkl)
    assert kw['width'] == 8 and kw['depths'] == (1, 2, 1, 1)
    blobs = V.read_caffe2_pkl(pkl)
    assert {V.caffe2_to_key(n) for n in blobs} - {None} == {k for k in sd if not k.endswith('num_batches_tracked')}
    for n, v in blobs.items():
        if (k := V.caffe2_to_key(n)): np.testing.assert_array_equal(sd[k].numpy(), v)
    torch.save({'model_state': sd, 'epoch': 1}, tmp_path / 'sf.pyth')  # PySlowFast's own PyTorch format
    a, b = V.SlowFastEncoder(pkl), V.SlowFastEncoder(tmp_path / 'sf.pyth')
    x = torch.randint(0, 255, (2, 32, 64, 64, 3), dtype=torch.uint8)
    assert a.video_dim == 8 * 32 + 32 and torch.equal(a.encode_frames(x), b.encode_frames(x))
    import pickle
    bad = dict(blobs)
    bad['conv1_w'] = np.zeros((3, 3), np.float32)
    (tmp_path / 'shape.pkl').write_bytes(pickle.dumps({'blobs': bad}, protocol=2))
    with pytest.raises(ValueError, match=r's1.pathway0_stem.conv.weight has shape \(3, 3\)'):
        V.SlowFastEncoder(tmp_path / 'shape.pkl')
    bad = {k: v for k, v in blobs.items() if k != 'res3_0_branch2b_w'}
    (tmp_path / 'miss.pkl').write_bytes(pickle.dumps({'blobs': bad}, protocol=2))
    with pytest.raises(ValueError, match='missing 1 SlowFast weights'): V.SlowFastEncoder(tmp_path / 'miss.pkl')
    (tmp_path / 'unknown.pkl').write_bytes(pickle.dumps({'blobs': {**blobs, 'fc9_w': np.zeros(1)}}, protocol=2))
    with pytest.raises(KeyError, match="unknown Caffe2 blob 'fc9_w'"): V.SlowFastEncoder(tmp_path / 'unknown.pkl')


def _hero_brute(frame_t, end, duration, fps, clip_len):
    "HERO's SlowFast clips by brute force: all fps=30 slots, padded, cut, ceil(T/c) kept, HERO's 32 indices."
    n = max(1, math.floor(end * 30 + 0.5 + 1e-9))
    slots = _last_before(frame_t, (np.arange(n) + 0.5) / 30)
    slots += [slots[-1]] * (-len(slots) % 30)
    secs = len(slots) // 30
    p = Fraction(clip_len).numerator
    for _ in range(-secs % p): slots += slots[-30:]
    per = int(clip_len * 30)
    clips = [slots[i:i + per] for i in range(0, len(slots), per)][:math.ceil(duration / clip_len)]
    idx = np.clip(np.floor(np.linspace(0, 64 * math.floor(fps) / 30 - 1, 32)), 0, per - 1).astype(int)
    return [[c[j] for j in idx] for c in clips]


@pytest.mark.parametrize('duration,fps,clip_len',
                         [(5, 30, 2.), (7.3, 25, 2.), (4.9, 10, 2.), (6, 24, 1.), (3.1, 30, 1.5)])
def test_hero_clips_brute_force(tmp_path, duration, fps, clip_len):
    p = V.make_test_video(tmp_path / 'v.mp4', duration, fps, size=(32, 24))
    got = [V.frame_index_of(c.frames).tolist() for c in V.hero_clip_frames(p, clip_len, size=16)]
    n = int(round(duration * fps))
    assert got == _hero_brute(np.arange(n) / fps, n / fps, n / fps, fps, clip_len)


def test_short_video_frame_rate_rule(tmp_path, encoders):
    "Under clip_len + 0.1 s the official CLIP/BLIP reader asks FFmpeg for 2/max(int(T), 1) fps."
    p = V.make_test_video(tmp_path / 'v.mp4', 1.6, 10, size=(32, 24))
    feats = V.extract_video(p, {'clip': encoders['clip']})
    assert feats['clip_features'].shape[0] == 3  # round(1.6 * 2)
    long = V.make_test_video(tmp_path / 'w.mp4', 2.2, 10, size=(32, 24))
    assert V.extract_video(long, {'clip': encoders['clip']})['clip_features'].shape[0] == 1


def test_clip_official_text_rule(encoders):
    "SOT + first 30 BPE tokens + EOT; as many states as non-zero ids (id 0 is '!' inside a punctuation run)."
    c = encoders['clip']
    ids = c.tokenizer.encode('a cat!! and a dog')
    assert 0 in ids
    assert c.encode_text(['a cat!! and a dog'])[0].shape[0] == len(ids) + 2 - ids.count(0)
    assert [t.shape[0] for t in c.encode_text(['dog ' * 50, 'a cat'])] == [32, len(c.tokenizer.encode('a cat')) + 2]


def test_blip_caption_cleaning(encoders):
    b = encoders['blip']
    a, c = b.encode_text(['The dog (brown) runs.', 'the dog brown runs'])
    torch.testing.assert_close(a, c)


@pytest.fixture(scope='module')
def lavis_dir(tmp_path_factory):
    return V.make_tiny_lavis_blip2(tmp_path_factory.mktemp('lavis') / 'blip2')


def test_lavis_names_map_both_ways(lavis_dir):
    "Every LAVIS weight the extractor reads has a transformers name and back; the rest (LM head, temp) none."
    sd = {**{'visual_encoder.' + k: v for k, v in torch.load(lavis_dir / 'eva_vit_g.pth').items()},
          **torch.load(lavis_dir / 'blip2_pretrained.pth')['model']}
    unused = {k for k in sd if V.lavis_key_to_hf(k) is None}
    assert unused == {'temp', 'Qformer.bert.embeddings.position_ids'}
    assert all(V.hf_key_to_lavis(V.lavis_key_to_hf(k)) == k for k in sd if k not in unused)
    cfg, hf, _ = V.read_lavis_blip2(lavis_dir)
    model_keys = set(__import__('transformers').Blip2ForImageTextRetrieval(cfg).state_dict())
    assert set(hf) == model_keys  # every parameter set, nothing left over
    assert {V.hf_key_to_lavis(k) for k in hf if not k.endswith('qkv.bias')} == \
           {k for k in sd if k not in unused and not k.endswith(('q_bias', 'v_bias')) and '.blocks.2.' not in k}


def test_lavis_and_transformers_forms_agree(lavis_dir, tmp_path):
    "The LAVIS folder (or its blip2_pretrained.pth) and the same weights saved by transformers: the same features."
    a, b = V.BLIP2Encoder(lavis_dir), V.BLIP2Encoder(lavis_dir / 'blip2_pretrained.pth')
    a.model.save_pretrained(tmp_path / 'hf')
    a.tokenizer.save_pretrained(tmp_path / 'hf')
    c = V.BLIP2Encoder(tmp_path / 'hf')  # rounding the ViT to float16 again changes nothing
    for k, v in a.model.state_dict().items(): assert torch.equal(v, c.model.state_dict()[k]), k
    frames = np.random.RandomState(0).randint(0, 256, (2, 1, 224, 224, 3), dtype=np.uint8)
    fa, fb, fc = (e.encode_frames(frames) for e in (a, b, c))
    assert fa.shape == (2, 64) and torch.equal(fa, fb)
    torch.testing.assert_close(fc, fa, rtol=0, atol=1e-6)
    q = ['A man opens the door; then two people laugh!', 'the dog']
    for x, y in zip(a.encode_text(q), c.encode_text(q)): torch.testing.assert_close(y, x, rtol=0, atol=1e-6)
    assert a.tokenizer.bos_token == '[DEC]' and len(a.tokenizer) == a.model.config.qformer_config.vocab_size


def test_lavis_folder_errors(lavis_dir, tmp_path):
    import shutil
    d = tmp_path / 'no_vit'
    shutil.copytree(lavis_dir, d)
    (d / 'eva_vit_g.pth').unlink()
    with pytest.raises(FileNotFoundError, match='eva_vit_g.pth'): V.BLIP2Encoder(d)
    d = tmp_path / 'no_bert'
    shutil.copytree(lavis_dir, d)
    shutil.rmtree(d / 'bert-base-uncased')
    with pytest.raises(FileNotFoundError, match='bert-base-uncased'): V.BLIP2Encoder(d)
    d = tmp_path / 'junk'
    d.mkdir()
    (d / 'blip2_pretrained.pth').write_bytes(b'junk')
    with pytest.raises(ValueError, match='blip2_pretrained.pth: not a readable PyTorch weights file'): V.BLIP2Encoder(d)


def test_extract_cli_lavis_blip2(tmp_path, lavis_dir):
    "`--blip-model` takes LAVIS' folder: float32 video features of the Q-Former width, text with [CLS]/[SEP]."
    V.make_test_video(tmp_path / 'v.mp4', 7, fps=4, size=(32, 24))
    (tmp_path / 'q.jsonl').write_text('{"qid": 1, "query": "The dog runs!!"}\n')
    out = tmp_path / 'f.h5'
    assert cli_main(['extract', str(tmp_path / 'v.mp4'), '--encoders', 'blip', '--blip-model', str(lavis_dir),
                     '--out', str(out), '--queries', str(tmp_path / 'q.jsonl')]) == 0
    with h5py.File(out) as h5:
        v = h5['video/blip_video_features/v']
        assert v.shape == (4, 64) and v.dtype == np.float32
        assert h5['text/blip_aug_text_features_openai/1'].shape == (6, 64)  # [CLS] the dog run ##s [SEP]


def test_require_says_what_to_install(monkeypatch):
    import importlib
    real = importlib.import_module
    monkeypatch.setattr(importlib, 'import_module',
                        lambda n, *a: (_ for _ in ()).throw(ImportError(n)) if n == 'av' else real(n, *a))
    with pytest.raises(ImportError, match=r'videolights\[extract\]'): V.require('av', 'video decoding')


# --- extraction -----------------------------------------------------------------------------------------------------

def test_extract_cli_folder_resumable(tmp_path, enc_dirs, capsys):
    vd = tmp_path / 'vids'
    vd.mkdir()
    for name, dur in [('short', 10), ('mid', 45), ('long', 600)]:
        V.make_test_video(vd / f'{name}.mp4', dur, fps=1 if dur > 60 else 3, size=(32, 24))
    (tmp_path / 'q.jsonl').write_text('{"qid": 7, "query": "the dog runs"}\n{"qid": "x1", "query": "a cat"}\n')
    out = tmp_path / 'f.h5'
    argv = ['extract', str(vd), '--encoders', 'clip,blip', '--clip-model', str(enc_dirs['clip']), '--blip-model',
            str(enc_dirs['blip']), '--out', str(out), '--queries', str(tmp_path / 'q.jsonl'), '--fp16']
    assert cli_main(argv) == 0
    assert '3 video(s) extracted' in capsys.readouterr().out
    with h5py.File(out) as h5:
        assert {k: h5[f'video/clip_features/{k}'].shape for k in ['short', 'mid', 'long']} == \
               {'short': (5, 8), 'mid': (23, 8), 'long': (300, 8)}
        assert h5['video/blip_video_features/long'].shape == (300, 24)
        assert h5['video/clip_features/long'].dtype == np.float16
        assert h5['video/clip_features'].attrs['dim'] == 8 and h5['video/clip_features'].attrs['n'] == 3
        assert h5['video/clip_features/mid'].attrs['duration'] == pytest.approx(45.)
        assert (h5['text/clip_text_features/7'].shape[1] == 16
                and h5['text/blip_aug_text_features_openai/x1'].shape == (4, 24))
    assert cli_main(argv) == 0
    assert '0 video(s) extracted, 3 already there' in capsys.readouterr().out
    # the data layer reads the store
    src = open_features(out)
    assert load_video_feats(src, 'mid', ['clip_features', 'blip_video_features'], max_v_l=75).shape == (23, 32)
    src.close()


def test_extract_cli_errors(tmp_path, enc_dirs, capsys):
    (tmp_path / 'junk.mp4').write_bytes(b'junk' * 100)
    clip = ['--clip-model', str(enc_dirs['clip'])]
    assert V.extract_main([str(tmp_path / 'junk.mp4'), *clip, '--out', str(tmp_path / 'f.h5')]) == 2
    assert 'videolights extract: error: ' in capsys.readouterr().err
    (tmp_path / 'bad.jsonl').write_text('{"qid": 1, "query": "ok"}\n{"qid": 2, "query": ""}\n')
    assert V.extract_main(['--queries', str(tmp_path / 'bad.jsonl'), *clip, '--out', str(tmp_path / 'g.h5')]) == 2
    assert 'bad.jsonl:2: a record needs' in capsys.readouterr().err
    assert V.extract_main([str(tmp_path / 'no_such_dir'), *clip, '--out', str(tmp_path / 'g.h5')]) == 2
    assert 'no_such_dir: no such file or folder' in capsys.readouterr().err
    assert V.extract_main([str(tmp_path), '--encoders', 'clip,i3d', '--out', str(tmp_path / 'g.h5')]) == 2
    assert "unknown encoder(s) ['i3d']" in capsys.readouterr().err
    assert V.extract_main([str(tmp_path / 'junk.mp4'), '--clip-model', str(tmp_path / 'nomodel'), '--out',
                           str(tmp_path / 'h.h5')]) == 2
    assert 'could not load CLIP' in capsys.readouterr().err
    with pytest.raises(ValueError, match='unknown encoder'): V.load_encoders('clip,i3d')


def test_extract_group_names_follow_dataset(tmp_path, enc_dirs):
    (tmp_path / 'q.jsonl').write_text('{"qid": 1, "query": "the dog"}\n')
    args = ['--queries', str(tmp_path / 'q.jsonl'), '--encoders', 'clip,blip', '--clip-model', str(enc_dirs['clip']),
            '--blip-model', str(enc_dirs['blip'])]
    assert V.extract_main([*args, '--out', str(tmp_path / 'c.h5'), '--dset-name', 'charadesSTA']) == 0
    with h5py.File(tmp_path / 'c.h5') as h5: assert sorted(h5['text']) == ['blip_text_features', 'clip_text_features']
    assert V.extract_main([*args, '--out', str(tmp_path / 't.h5'), '--dset-name', 'tvsum']) == 0
    with h5py.File(tmp_path / 't.h5') as h5: assert 'query_features' in h5['text']


def test_train_on_own_videos_then_predict(tmp_path, enc_dirs, capsys):
    "Own videos -> extract -> videolights train (tiny, 2 epochs) -> videolights predict with the run."
    rng = np.random.default_rng(0)
    vd, data = tmp_path / 'videos', tmp_path / 'data'
    vd.mkdir()
    data.mkdir()
    recs, words = [], 'a the dog cat man woman car runs jumps and in on of'.split()
    for i in range(8):
        dur = float(rng.integers(20, 40))
        V.make_test_video(vd / f'v{i}.mp4', dur, 2, size=(32, 24))
        n = V.n_clips_of(dur)
        for j in range(2):
            s = int(rng.integers(0, n - 3))
            ids = list(range(s, s + 3))
            recs.append(dict(qid=i * 10 + j, query=' '.join(rng.choice(words, 4)), vid=f'v{i}', duration=dur,
                             relevant_windows=[[2. * s, 2. * s + 6.]], relevant_clip_ids=ids,
                             saliency_scores=[[int(x) for x in rng.integers(1, 5, 3)] for _ in ids]))
    (data / 'train.jsonl').write_text(''.join(json.dumps(r) + '\n' for r in recs[:12]))
    (data / 'val.jsonl').write_text(''.join(json.dumps(r) + '\n' for r in recs[12:]))
    (data / 'queries.jsonl').write_text(''.join(json.dumps(r) + '\n' for r in recs))
    assert cli_main(['extract', str(vd), '--encoders', 'clip', '--clip-model', str(enc_dirs['clip']),
                     '--out', str(data / 'features.h5'), '--queries', str(data / 'queries.jsonl')]) == 0
    run = tmp_path / 'run'
    assert cli_main(['train', '--preset', 'tiny', '--data', str(data), '--out', str(run), '--no-progress',
                     '--no-tensorboard', '--device', 'cpu', '--v_feat_types', 'clip', '--v_feat_dims', '8',
                     '--t_feat_types', 'clip', '--t_feat_dims', '16', '--epochs', '2', '--eval_every', '1',
                     '--bsz', '4', '--num_workers', '0']) == 0
    capsys.readouterr()
    assert cli_main(['predict', str(vd / 'v3.mp4'), '-q', recs[6]['query'], '--ckpt', str(run),
                     '--clip-model', str(enc_dirs['clip']), '--json', str(tmp_path / 'p.jsonl')]) == 0
    out = json.loads((tmp_path / 'p.jsonl').read_text())
    assert len(out['pred_saliency_scores']) == V.n_clips_of(recs[6]['duration'])


def test_sampling_is_streamed(tmp_path, monkeypatch):
    "The first clip comes out after decoding about one clip's frames, not the whole video."
    p = V.make_test_video(tmp_path / 'long.mp4', 600, 1, size=(32, 24))
    n = {'frames': 0}
    real = V._decoded
    def counting(c):
        for x in real(c):
            n['frames'] += 1
            yield x
    monkeypatch.setattr(V, '_decoded', counting)
    g = V.sample_clip_frames(p, 2., size=16)
    first = next(g)
    assert first.clip_id == 0 and n['frames'] <= 2
    for _ in range(9): next(g)
    assert n['frames'] <= 21
    g.close()


def test_features_match_direct_encoding(tmp_path, encoders):
    p = V.make_test_video(tmp_path / 'v.mp4', 20, 2, size=(48, 32))
    feats = V.extract_video(p, encoders, clip_len=2., batch_size=3)
    frames = np.stack([c.frames for c in V.sample_clip_frames(p, 2., 1, 224)])
    np.testing.assert_allclose(feats['clip_features'], encoders['clip'].encode_frames(torch.from_numpy(frames)).numpy(),
                               atol=1e-5)
    assert feats['blip_video_features'].shape == (10, 24)


class _DenseIndexEncoder(V.VideoEncoder):
    "A stand-in clip-level encoder (like SlowFast): 4 frames per clip, returns the frame indices it was given."
    name, video_feature_type, video_dim, frames_per_clip, frame_size = 'dense', 'dense_features', 4, 4, 16
    def encode_frames(self, frames):  # (N, 4, 16, 16, 3) -> (N, 4)
        return torch.from_numpy(V.frame_index_of(np.asarray(frames)).astype(np.float32))


def test_extract_dense_and_per_clip_encoders_share_the_clip_grid(tmp_path, encoders):
    p = V.make_test_video(tmp_path / 'v.mp4', 21, 4, size=(32, 24))  # 84 frames every 0.25 s, 11 clips
    feats = V.extract_video(p, {'clip': encoders['clip'], 'dense': _DenseIndexEncoder()}, clip_len=2., batch_size=3)
    assert feats['clip_features'].shape == (11, 8) and feats['dense_features'].shape == (11, 4)
    frame_t = np.arange(84) / 4
    want = np.array(_last_before(frame_t, (np.arange(44) + 0.5) * 0.5)).reshape(11, 4)
    np.testing.assert_array_equal(feats['dense_features'], want)


# --- predictor ------------------------------------------------------------------------------------------------------

def _direct(pred, ev, query):
    "Brute force: run the model window by window, one pair at a time."
    txt = pred._text_inputs([query])[0]
    starts, wins = pred._video_windows(ev)
    outs = []
    with torch.no_grad():
        for w in wins:
            o = pred.model(src_txt=txt[None], src_txt_mask=torch.ones(1, len(txt)), src_vid=w[None],
                           src_vid_mask=torch.ones(1, len(w)))
            outs.append((o['pred_spans'][0].numpy(), o['pred_logits'][0].softmax(-1)[:, 0].numpy(),
                         o['saliency_scores'][0].numpy()))
    return starts, outs


@pytest.mark.parametrize('duration', [10, 31, 100, 600])
def test_predict_shapes_and_windows(tmp_path, run_dir, encoders, duration):
    pred = V.VideoLightsPredictor.from_pretrained(run_dir, encoders=encoders)
    p = V.make_test_video(tmp_path / 'v.mp4', duration, fps=1 if duration > 60 else 2, size=(32, 24))
    out = pred.predict('the dog runs', p)
    n = math.ceil(duration / 2)
    assert len(out.saliency) == n
    w = out.windows
    assert len(w) == min(10, 5 * len(V.window_starts(n, 16, pred.overlap)))  # tiny preset: Nq = 5 per window
    assert (w[:, 0] >= 0).all() and (w[:, 1] <= duration + 1e-6).all() and (w[:, 0] <= w[:, 1]).all()
    assert (np.diff(w[:, 2]) <= 0).all()
    # brute force: saliency = mean over covering windows of each window's own output
    starts, outs = _direct(pred, pred.encode_video(p), 'the dog runs')
    tot, cnt = np.zeros(n), np.zeros(n)
    for s, (_, _, sal) in zip(starts, outs):
        tot[s:s + len(sal)] += sal
        cnt[s:s + len(sal)] += 1
    np.testing.assert_allclose(out.saliency, tot / cnt, atol=1e-5)
    # the best merged window is the best-scored window of any single window, shifted to absolute time
    best = max(((sc.max(), s, sp[sc.argmax()]) for s, (sp, sc, sal) in zip(starts, outs)), key=lambda x: x[0])
    wl = min(16, n) * 2.
    c, wd = best[2]
    np.testing.assert_allclose(w[0], [max(0, best[1] * 2 + (c - wd / 2) * wl),
                                      min(duration, best[1] * 2 + (c + wd / 2) * wl), best[0]], atol=1e-4)


@pytest.mark.parametrize('fix', [False, True])
def test_batched_equals_one_by_one(tmp_path, encoders, fix):
    d = tmp_path / 'run'
    torch.manual_seed(1)
    cfg = _cfg(fix_bicmf_mask_order=fix)
    save_checkpoint(dict(model=build_model(cfg).state_dict(), config=config_dict(cfg)), d / 'model_best.ckpt')
    pred = V.VideoLightsPredictor.from_pretrained(d, encoders=encoders)
    p = V.make_test_video(tmp_path / 'v.mp4', 90, fps=1, size=(32, 24))
    qs = ['the dog runs', 'a cat', 'a man and a woman in the car', 'the cat jumps on the dog', 'dog']
    many = pred.predict(qs, p)
    for q, m in zip(qs, many):
        one = pred.predict(q, p)
        np.testing.assert_allclose(m.windows, one.windows, atol=1e-5)
        np.testing.assert_allclose(m.saliency, one.saliency, atol=1e-5)


def test_predictor_bad_input(tmp_path, run_dir, encoders, enc_dirs):
    pred = V.VideoLightsPredictor.from_pretrained(run_dir, encoders=encoders)
    p = V.make_test_video(tmp_path / 'v.mp4', 10, 2, size=(32, 24))
    with pytest.raises(ValueError, match='query 0 is empty'): pred.predict('', p)
    with pytest.raises(ValueError, match='no queries'): pred.predict([], p)
    with pytest.raises(V.VideoError, match='no video stream'): pred.predict('a dog', _audio_only(tmp_path / 'a.wav'))
    (tmp_path / 'empty.mp4').write_bytes(b'')
    with pytest.raises(V.VideoError, match='empty file'): pred.predict('a dog', tmp_path / 'empty.mp4')
    wide = V.CLIPEncoder(V.make_tiny_clip(tmp_path / 'wide', dim=32, proj_dim=16))
    with pytest.raises(ValueError, match=r'trained on video clip\(8\) \+ blip\(24\).*encoders give video clip\(16\)'):
        V.VideoLightsPredictor.from_pretrained(run_dir, encoders={'clip': wide, 'blip': encoders['blip']})
    with pytest.raises(ValueError, match="needs text features 'blip'|needs video features 'blip'"):
        V.VideoLightsPredictor.from_pretrained(run_dir, encoders={'clip': encoders['clip']})
    torch.save({'state': 1}, tmp_path / 'other.ckpt')
    with pytest.raises(ValueError, match='not a videolights checkpoint'):
        V.VideoLightsPredictor.from_pretrained(tmp_path / 'other.ckpt')
    (tmp_path / 'emptyrun').mkdir()
    with pytest.raises(FileNotFoundError,
                       match='no model_best.ckpt'): V.VideoLightsPredictor.from_pretrained(tmp_path / 'emptyrun')


def test_official_checkpoint(tmp_path):
    "An official checkpoint (state dict under official names + argparse opt) loads through videolights.convert."
    import argparse
    from videolights.convert import to_official_state_dict, config_from_opt
    clip = V.CLIPEncoder(V.make_tiny_clip(tmp_path / 'clip512', dim=16, proj_dim=512, text_dim=512))
    opt = argparse.Namespace(dset_name='hl', v_feat_dim=514, t_feat_dim=512,
                             v_feat_dirs=['../qvhl/features/clip_features'],
                             t_feat_dirs=['../qvhl/features/clip_text_features'], ctx_mode='video_tef', clip_length=2,
                             max_v_l=16, max_q_l=32)
    cfg = config_from_opt(opt)
    assert cfg.v_feat_types == ('clip',) and cfg.t_feat_types == ('clip',)
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    torch.save({'model': to_official_state_dict(model), 'opt': opt, 'epoch': 3}, tmp_path / 'official.ckpt')
    pred = V.VideoLightsPredictor.from_pretrained(tmp_path / 'official.ckpt', encoders={'clip': clip})
    p = V.make_test_video(tmp_path / 'v.mp4', 50, 1, size=(32, 24))
    ref = V.VideoLightsPredictor(model, cfg, {'clip': clip})
    for a, b in zip(pred.predict(['the dog runs', 'a cat'], p), ref.predict(['the dog runs', 'a cat'], p)):
        np.testing.assert_allclose(a.windows, b.windows, atol=1e-5)
        np.testing.assert_allclose(a.saliency, b.saliency, atol=1e-5)
    with pytest.raises(ValueError, match=r'trained on video clip\(512\)'):
        V.VideoLightsPredictor.from_pretrained(tmp_path / 'official.ckpt',
                                               encoders={'clip': V.CLIPEncoder(V.make_tiny_clip(tmp_path / 'c8'))})


def test_predict_cli(tmp_path, run_dir, enc_dirs, capsys):
    p = V.make_test_video(tmp_path / 'v.mp4', 70, 1, size=(32, 24))
    rc = cli_main(['predict', str(p), '--query', 'the dog runs', '-q', 'a cat', '--ckpt',
                   str(run_dir / 'model_best.ckpt'),
                   '--clip-model', str(enc_dirs['clip']), '--blip-model', str(enc_dirs['blip']), '--json',
                   str(tmp_path / 'o.jsonl'), '--plot', str(tmp_path / 'o.png'), '--top-k', '3'])
    assert rc == 0
    out = capsys.readouterr().out
    assert "query: 'the dog runs'" in out and "query: 'a cat'" in out and '35 clips' in out
    assert out.count('saliency peak: clip ') == 2
    recs = [json.loads(l) for l in (tmp_path / 'o.jsonl').read_text().splitlines()]
    assert len(recs) == 2 and len(recs[1]['pred_saliency_scores']) == 35
    assert all(len(w) == 3 for w in recs[0]['pred_relevant_windows'])
    assert (tmp_path / 'o.png').stat().st_size > 2000
    with pytest.raises(SystemExit): V.predict_main([str(p), '--ckpt', str(run_dir)])  # --query is required
    assert V.predict_main([str(p), '-q', ' ', '--ckpt', str(run_dir), '--clip-model', str(enc_dirs['clip']),
                           '--blip-model', str(enc_dirs['blip'])]) == 2
    assert 'videolights predict: error: query 0 is empty' in capsys.readouterr().err


def test_widget_logic(tmp_path, run_dir, encoders):
    pred = V.VideoLightsPredictor.from_pretrained(run_dir, encoders=encoders)
    V.make_test_video(tmp_path / 'b.mp4', 40, 2, size=(32, 24))
    V.make_test_video(tmp_path / 'a.mp4', 12, 2, size=(32, 24))
    app = V.PredictorApp(pred, tmp_path, n_thumbs=2)
    assert [Path(v).name for v in app.videos()] == ['a.mp4', 'b.mp4']
    msg = app.on_click(app.videos()[1], 'the dog runs')
    assert msg.startswith('1 query on b.mp4: best ')
    assert len(app.last[1].axes) == 1 + 2
    assert app.on_click(app.videos()[1], '').startswith('error: type at least one query')
    assert type(app.widget()).__name__ == 'VBox'


def test_predictor_compile_option(tmp_path, monkeypatch):
    "`compile=True` runs the model through `accel.compile_inference` (eval-only compile); off by default."
    import videolights.accel as M
    seen = []
    monkeypatch.setattr(M, 'compile_inference', lambda m: seen.append(m.training) or m)
    clip = V.CLIPEncoder(V.make_tiny_clip(tmp_path / 'clip', dim=16, proj_dim=8, text_dim=8))
    cfg = get_preset('tiny', v_feat_types=('clip',), t_feat_types=('clip',), v_feat_dims=(8,), t_feat_dims=(8,))
    model = build_model(cfg)
    V.VideoLightsPredictor(model, cfg, {'clip': clip})
    assert seen == []
    pr = V.VideoLightsPredictor(model, cfg, {'clip': clip}, compile=True)
    assert seen == [False] and pr.model is model


# --- the published checkpoints' configurations ----------------------------------------------------------------------

def _official_ckpt(path, dset='hl', clip_length=2, blip=True):
    "A random checkpoint in the official format (official names + argparse opt) with the published input widths."
    import argparse
    from videolights.convert import to_official_state_dict, config_from_opt
    vdirs = ['f/slowfast_features', 'f/clip_features'] + ['f/blip_video_features'] * blip
    tdirs = ['f/clip_text_features'] + ['f/blip_text_features'] * blip
    opt = argparse.Namespace(dset_name=dset, ctx_mode='video_tef', v_feat_dim=2304 + 512 + 768 * blip + 2,
                             t_feat_dim=512 + 768 * blip, hidden_dim=32, nheads=4, dim_feedforward=64, bicmf_layers=1,
                             enc_layers=1, dec_layers=1, num_queries=5, clip_length=clip_length, max_q_l=32, max_v_l=75,
                             v_feat_dirs=vdirs, t_feat_dirs=tdirs)
    torch.manual_seed(0)
    torch.save(dict(model=to_official_state_dict(build_model(config_from_opt(opt))), opt=opt, epoch=1), path)
    return path


def test_predict_cli_official_formats(tmp_path, capsys):
    "predict with a SlowFast .pkl and an OpenAI-format CLIP folder (our checkpoint format, toy widths)."
    sf, oc = V.make_tiny_slowfast(tmp_path / 'sf.pkl'), V.make_tiny_openai_clip(tmp_path / 'clip')
    cfg = get_preset('tiny', v_feat_types=('slowfast', 'clip'), v_feat_dims=(288, 32), t_feat_types=('clip',),
                     t_feat_dims=(64,), max_v_l=16, max_q_l=32)
    torch.manual_seed(0)
    save_checkpoint(dict(model=build_model(cfg).state_dict(), config=config_dict(cfg)),
                    tmp_path / 'run' / 'model_best.ckpt')
    p = V.make_test_video(tmp_path / 'v.mp4', 9, 5, size=(32, 24))
    rc = cli_main(['predict', str(p), '-q', 'the dog runs', '--ckpt', str(tmp_path / 'run'), '--slowfast-model',
                   str(sf),
                   '--clip-model', str(oc / 'model.pt'), '--json', str(tmp_path / 'p.jsonl'), '--device', 'cpu'])
    assert rc == 0
    rec = json.loads((tmp_path / 'p.jsonl').read_text())
    assert len(rec['pred_saliency_scores']) == 5  # SlowFast ceil(9/2) = 5, CLIP round(4.5) = 5


def test_predict_official_width_mismatch_is_one_line_before_the_video(tmp_path, capsys):
    ck = _official_ckpt(tmp_path / 'off.ckpt', blip=True)
    rc = cli_main(['predict', str(tmp_path / 'never_read.mp4'), '-q', 'a dog', '--ckpt', str(ck),
                   '--slowfast-model', str(V.make_tiny_slowfast(tmp_path / 'sf.pkl')),
                   '--clip-model', str(V.make_tiny_openai_clip(tmp_path / 'clip')),
                   '--blip-model', str(V.make_tiny_blip2(tmp_path / 'blip')), '--device', 'cpu'])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1
    assert 'trained on video slowfast(2304) + clip(512) + blip(768) and text clip(512) + blip(768)' in err
    assert 'never_read.mp4' not in err


@pytest.mark.slow
@pytest.mark.parametrize('dset,clip_length,blip', [('hl', 2, False), ('hl', 2, True), ('charadesSTA', 1, True)])
def test_predict_published_configurations(tmp_path, dset, clip_length, blip):
    "Official-format checkpoints with the published widths run end to end on toy encoders of those widths."
    ck = _official_ckpt(tmp_path / 'off.ckpt', dset, clip_length, blip)
    sf = V.make_tiny_slowfast(tmp_path / 'sf.pkl', width=64, depths=(1, 1, 1, 1))  # 2048 + 256
    oc = V.make_tiny_openai_clip(tmp_path / 'clip', width=512, embed=512)
    argv = ['predict', str(V.make_test_video(tmp_path / 'v.mp4', 4.4, 5, size=(64, 48))), '-q', 'the dog runs', '-q',
            'a cat',
            '--ckpt', str(ck), '--slowfast-model', str(sf), '--clip-model', str(oc), '--json',
            str(tmp_path / 'p.jsonl'), '--device', 'cpu']
    if blip: argv += ['--blip-model', str(V.make_tiny_blip2(tmp_path / 'blip', dim=768))]
    assert cli_main(argv) == 0
    recs = [json.loads(l) for l in (tmp_path / 'p.jsonl').read_text().splitlines()]
    n = 2 if clip_length == 2 else 4  # CLIP round(4.4/2) = 2, SlowFast ceil = 3 -> 2; at 1 s: round 4, ceil 5 -> 4
    assert [len(r['pred_saliency_scores']) for r in recs] == [n, n]
    assert all(0 <= w[0] <= w[1] <= 4.4 for r in recs for w in r['pred_relevant_windows'])


def test_predictor_accelerates_the_model_unless_asked_not_to(tmp_path):
    """The predictor swaps in the fast layers of `ops` (in place, same weights); `accelerate=False` keeps the plain
    model."""
    from videolights.ops import is_accelerated
    clip = V.CLIPEncoder(V.make_tiny_clip(tmp_path / 'clip', dim=16, proj_dim=8, text_dim=8))
    cfg = get_preset('tiny', v_feat_types=('clip',), t_feat_types=('clip',), v_feat_dims=(8,), t_feat_dims=(8,))
    plain = V.VideoLightsPredictor(build_model(cfg), cfg, {'clip': clip}, accelerate=False)
    fast = V.VideoLightsPredictor(build_model(cfg), cfg, {'clip': clip})
    assert not is_accelerated(plain.model) and is_accelerated(fast.model)
