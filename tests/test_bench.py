"""Benchmark CLI and harness (tiny sizes; the real measurements are run by hand), and the speed-up equivalences."""
import io, json, contextlib, math, os, subprocess, sys
from pathlib import Path

import pytest
import torch

from videolights import bench
from videolights.config import get_preset

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / 'tools' / 'official'))
import official_harness  # noqa: E402  (finds the official checkout through $VIDEOLIGHTS_OFFICIAL)
OFFICIAL_MISSING = official_harness.missing()
HAVE_OFFICIAL = OFFICIAL_MISSING is None
OFFICIAL = str(official_harness.checkout()) if HAVE_OFFICIAL else None
NOWHERE = str(Path(__file__).resolve().parent / 'no_such_checkout')
needs_official = pytest.mark.skipif(not HAVE_OFFICIAL, reason=str(OFFICIAL_MISSING))


def run_main(argv):
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = bench.main(argv)
    return rc, out.getvalue(), err.getvalue()


def test_synth_batch_follows_the_contract():
    cfg = get_preset('qvhighlights')
    mi, tg, metas = bench.synth_batch(cfg, B=5, seed=3)
    n = mi['src_vid_mask'].sum(1).long()
    assert mi['src_vid'].shape == (5, int(n.max()), 3586) and mi['src_txt'].shape[-1] == 1280
    assert ((20 <= n) & (n <= 75)).all()
    assert n.tolist() == [m['n_clips'] for m in metas]
    # padding is zero, TEF is the last 2 columns, spans are normalised cxw inside the video
    assert (mi['src_vid'][mi['src_vid_mask'] == 0] == 0).all()
    for b, t in enumerate(tg['span_labels']):
        s = t['spans']
        assert 1 <= len(s) <= 3 and (s[:, 1] > 0).all() and ((s[:, 0] - s[:, 1] / 2) >= -1e-6).all()
        assert (tg['saliency_pos_labels'][b] < n[b]).all() and (tg['saliency_all_labels'][b, n[b]:] == 0).all()
    # deterministic
    mi2, _, _ = bench.synth_batch(cfg, B=5, seed=3)
    assert torch.equal(mi['src_vid'], mi2['src_vid'])


def test_train_step_cli_json_has_machine_and_medians(tmp_path):
    out = tmp_path / 'b.json'
    rc, stdout, _ = run_main(['train-step', '--preset', 'tiny', '--batch', '3', '--steps', '2', '--warmup', '0',
                              '--no-memory', '--threads', '1', '--json', str(out)])
    assert rc == 0
    d = json.loads(out.read_text())
    assert d == json.loads(stdout)
    m = d['machine']
    assert m['torch'] == torch.__version__ and m['torch_threads'] == 1 and m['cpu_count'] >= 1 and 'processor' in m
    assert m['cpu_isa'].split(',')[0] == torch.backends.cpu.get_cpu_capability()  # e.g. 'AVX2, family 25 model 1'
    assert f"({m['cpu_isa']})" in bench.format_targets([], m).splitlines()[0]
    r = d['train-step']
    assert r['preset'] == 'tiny' and len(r['ours']['step_ms_all']) == 2
    assert r['ours']['step_ms'] == pytest.approx(sorted(r['ours']['step_ms_all'])[0] / 2 + sorted(r['ours']['step_ms_all'])[1] / 2, abs=0.02)
    assert 'official' not in r and 'ratio' not in r


def test_infer_cli_and_peak_memory_child():
    rc, stdout, _ = run_main(['infer', '--preset', 'tiny', '--batches', '[1, 2]', '--runs', '2', '--warmup', '0'])
    assert rc == 0
    r = json.loads(stdout)['infer']
    assert r['b1']['ours']['ms'] > 0 and r['b2']['ours']['ms'] > 0
    assert isinstance(r['peak_rss_mib']['ours'], float) and r['peak_rss_mib']['ours'] > 50  # torch alone is > 50 MiB


def test_bad_arguments_exit_2():
    assert run_main(['train-step', '--compare-official', NOWHERE])[0] == 2
    assert run_main(['startup', '--keep'])[0] == 2  # a dangling extra option, not --keep-memory: no abbreviations
    assert run_main(['infer', '--steps'])[0] == 2  # dangling extra option
    if not torch.cuda.is_available():
        rc, _, err = run_main(['infer', '--device', 'cuda'])
        assert rc == 2 and 'cuda' in err


def test_options_a_benchmark_would_ignore_are_refused(monkeypatch):
    "A shared option or extra `--key` that the chosen benchmark does not use is an error naming both, not a no-op."
    monkeypatch.setattr(bench, 'BENCHES', {n: (lambda **kw: {'ok': 1}) for n in bench.BENCHES})  # nothing runs
    for argv, bad in ((['load', '--compile'], '--compile'), (['eval', '--amp', 'bf16'], '--amp'),
                      (['epoch', '--also-bf16'], '--also-bf16'), (['profile', '--plain-model'], '--plain-model'),
                      (['startup', '--no-memory', '--compile'], '--compile, --no-memory')):
        rc, _, err = run_main(argv)
        assert rc == 2 and f'{bad}: not used by the `{argv[0]}` benchmark' in err, (argv, err)
    assert run_main(['epoch', '--compile', '--plain-model', '--amp', 'bf16'])[0] == 0   # the epoch takes these
    assert run_main(['all', '--compile'])[0] == 0   # `all`: each benchmark takes the options it uses
    # extra --key value pairs: a parameter of the benchmark, or (train-step, infer, profile) a config field
    real = {n: f for n, f in zip(('load', 'infer'), (bench.bench_load, bench.bench_infer))}
    assert bench._unknown_keys([real['load']], {'n_vidoes': 3, 'workers': 2}) == ['--n_vidoes']
    assert bench._unknown_keys([real['infer']], {'runs': 2, 'lr': 1e-3, 'stpes': 3}) == ['--stpes']
    assert bench._unknown_keys([bench.profile_step], {'kind': 'infer', 'hidden_dim': 64}) == []
    assert bench._unknown_keys(list(real.values()), {'lr': 1e-3, 'workers': 2}, config=False) == ['--lr']
    rc, _, err = run_main(['all', '--n_vidoes', '3'])
    assert rc == 2 and '--n_vidoes: not a parameter of any benchmark' in err


def test_epoch_passes_our_options_to_videolights_train(monkeypatch, tmp_path):
    "`bench epoch --compile --plain-model` reach our `videolights train`; `--cuda-graphs` adds a graphed process."
    import argparse
    seen = []
    monkeypatch.setitem(bench.BENCHES, 'epoch', lambda **kw: seen.append(kw) or {'ok': 1})
    assert run_main(['epoch', '--compile', '--plain-model'])[0] == 0
    assert seen[0]['compile'] is True and seen[0]['accelerate'] is False and seen[0]['cuda_graphs'] is False
    a = argparse.Namespace(name='epoch', device='cuda', amp=None, compile=False, cuda_graphs=True, plain_model=False,
                           threads=None, compare_official=None, official_python=None)
    assert bench._shared_kwargs('epoch', a)['cuda_graphs'] is True
    def args(side, **kw):
        cmd, _ = bench._epoch_commands(side, tmp_path, tmp_path/'run', tmp_path/'p.json', get_preset('qvhighlights'),
                                       0, 'cuda', 'bf16', None, None, **kw)
        return json.loads(cmd[-1])
    plain, graphed = args('ours'), args('ours_graphs', compile=True, accelerate=False)
    assert '--cuda-graphs' not in plain and '--compile' not in plain and '--plain-model' not in plain
    assert graphed == plain + ['--compile', '--plain-model', '--cuda-graphs'] and plain[-2:] == ['--amp', 'bf16']


def test_all_gathers_every_benchmark_and_survives_a_failure(monkeypatch):
    calls = {}
    def fake(name, fail=False):
        def f(**kw):
            calls[name] = kw
            if fail: raise RuntimeError('boom')
            return dict(ratio=2.0) if 'official' in kw and kw['official'] else dict(ok=True)
        if name != 'epoch': return f
        def epoch(n_train=7218, n_val=1550, **kw): return f(n_train=n_train, n_val=n_val, **kw)  # names its options
        return epoch
    monkeypatch.setattr(bench, 'BENCHES', {n: fake(n, n == 'predict') for n in bench.BENCHES})
    rc, stdout, err = run_main(['all', '--compare-official', OFFICIAL if HAVE_OFFICIAL else NOWHERE, '--n_train', '64'])
    if not HAVE_OFFICIAL:
        assert rc == 2; return
    d = json.loads(stdout)
    assert set(calls) == {'startup', 'eval', 'load', 'train-step', 'infer', 'epoch', 'predict', 'extract'}
    assert d['predict'] == {'error': 'RuntimeError: boom'}
    assert calls['train-step']['official'] == OFFICIAL and calls['train-step']['device'] == 'cpu'
    assert all('official' not in calls[n] for n in ('predict', 'startup', 'extract'))
    assert calls['epoch']['n_train'] == 64 and calls['epoch']['n_val'] == 500   # --n_train reaches the epoch only
    assert 'n_train' not in calls['train-step']
    assert d['ratios_official_over_ours'] == {n: 2.0 for n in ('eval', 'load', 'train-step', 'infer', 'epoch')}
    t = {r['target']: r for r in d['targets']}
    assert t['train step, float32']['value'] == 2.0 and t['train step, float32']['met'] is False
    assert t['epoch: train + val evaluation, float32']['met'] is False and 'CPU:' in err


def test_check_targets_reads_every_goal():
    "Every target row finds its value in a complete result, and the comparison goes the right way."
    out = {'train-step': dict(ratio=2.6, ratio_bf16=5.1, rss_ours_over_official=0.9),
           'infer': dict(b1=dict(ratio=3.2, bf16_speedup=1.1), b32=dict(ratio=3.9, bf16_speedup=2.0),
                         rss_ours_over_official=1.2),
           'epoch': dict(ratio=3.5), 'eval': dict(ratio=30, process=dict(ratio=12, imports_torch=False)),
           'startup': dict(help_s=0.2), 'load': dict(ratio=6)}
    rows = {r['target']: r['met'] for r in bench.check_targets(out)}
    assert None not in rows.values() and len(rows) == len(bench.TARGETS)
    assert [k for k, v in rows.items() if not v] == ['inference B=32, float32', 'peak RSS, inference: ours / official']


def test_bf16_target_takes_the_worst_batch_size_where_bf16_ran():
    "The every-batch-size bf16 row: the largest bf16 / float32 time among sizes that ran bf16; float32 fallbacks aside."
    row = lambda infer: next(r for r in bench.check_targets({'infer': infer}) if r['target'].startswith('inference, every'))
    sweep = dict(b1=dict(bf16_speedup=0.5, bf16_runs_float32=True), b8=dict(bf16_speedup=1.25),
                 b16=dict(bf16_speedup=0.95), b32=dict(bf16_speedup=1.3))
    r = row(sweep)
    assert (r['value'], r['met'], r['goal']) == (1.05, False, '<= 1.0 (worst of B=1,8,16,32: B=16)')
    sweep['b16'] = dict(bf16_speedup=1.1)
    assert (row(sweep)['value'], row(sweep)['met']) == (0.91, True)
    r = row(dict(b1=dict(bf16_speedup=0.97, bf16_runs_float32=True)))  # one code path: the ratio is noise
    assert (r['value'], r['met'], r['goal']) == (1.03, True, '<= 1.0 (B=1; bf16 calls ran float32)')
    assert row(dict(b1=dict(ratio=2.0)))['met'] is None and row({})['value'] is None   # bf16 not timed


def test_profile_command(tmp_path):
    "`bench profile`: one profiled step; the top operators sorted by self time, their shares of the whole."
    rc, out, _ = run_main(['profile', '--kind', 'infer', '--preset', 'tiny', '--batch', '2', '--top', '5',
                           '--json', str(tmp_path/'p.json')])
    assert rc == 0
    p = json.loads(out)['profile']
    assert json.loads((tmp_path/'p.json').read_text())['profile']['kind'] == p['kind'] == 'infer'
    ms = [r['self_ms'] for r in p['top_ops']]
    assert len(ms) == 5 and ms == sorted(ms, reverse=True) and sum(ms) <= p['total_ms'] + 0.5
    assert abs(sum(f['pct'] for f in p['families'].values()) - 100) < 1.5   # families cover every operator
    assert p['device'] == 'cpu' and 'total_gpu_ms' not in p and p['shapes']['Lv'] > 0


@pytest.mark.skipif(not sys.platform.startswith('linux') or __import__('platform').libc_ver()[0] != 'glibc', reason='glibc only')
def test_keep_memory_flag_sets_the_policy_for_us_and_child_processes():
    "`--keep-memory`: the process keeps freed memory, and the MALLOC_* variables pass the same policy to children."
    env = {k: v for k, v in os.environ.items() if not k.startswith('MALLOC_') and k not in ('LD_PRELOAD', 'GLIBC_TUNABLES', 'VIDEOLIGHTS_KEEP_MEMORY')}
    def machine(*flags):
        r = subprocess.run([sys.executable, '-m', 'videolights.bench', 'profile', '--kind', 'infer', '--preset', 'tiny',
                            '--batch', '2', '--top', '2', *flags], capture_output=True, text=True, env=env, check=True)
        return json.loads(r.stdout)['machine']
    plain, kept = machine(), machine('--keep-memory')
    assert plain['keep_freed_memory'] is False and plain['malloc_env'] is None
    assert kept['keep_freed_memory'] is True
    assert kept['malloc_env'] == {'MALLOC_MMAP_THRESHOLD_': str(2**30), 'MALLOC_TRIM_THRESHOLD_': str(2**40)}


def test_module_entry_point():
    r = subprocess.run([sys.executable, '-m', 'videolights.bench', '--help'], capture_output=True, text=True)
    assert r.returncode == 0 and '--compare-official' in r.stdout and '--device' in r.stdout


@needs_official
def test_side_by_side_with_the_official_code():
    r = bench.bench_train_step('tiny', batch=2, steps=1, warmup=0, official=OFFICIAL, memory=False, hidden_dim=256, nheads=8)
    assert r['ratio'] > 0 and r['official']['step_ms'] > 0
    # same parameter count on both sides proves the official side was built from our config
    off = bench.load_official(OFFICIAL)
    om = bench.build_official(off, get_preset('qvhighlights'))[0]
    from videolights.model import build_model
    assert sum(p.numel() for p in om.parameters()) == sum(p.numel() for p in build_model(get_preset('qvhighlights')).parameters())
    i = bench.bench_infer('tiny', batches=(1,), runs=1, warmup=0, official=OFFICIAL, memory=False, hidden_dim=256, nheads=8)
    assert i['b1']['ratio'] > 0


@needs_official
def test_official_model_runs_on_the_cpu_beside_a_gpu(monkeypatch):
    "The official decoder calls `.cuda()`: on the CPU side of a GPU machine only its forward sees `.cuda()` as identity."
    real = torch.Tensor.cuda
    monkeypatch.setattr(torch.cuda, 'is_available', lambda: True)     # a GPU machine, as the official code sees it
    calls = []
    monkeypatch.setattr(torch.Tensor, 'cuda', lambda self, *a, **k: calls.append(1) or real(self, *a, **k))
    spy = torch.Tensor.cuda
    cfg = get_preset('tiny', hidden_dim=256, nheads=8)
    om = bench.build_official(bench.load_official(OFFICIAL), cfg, 'cpu')[0].eval()
    with torch.no_grad(): out = om(**bench.synth_batch(cfg, 2, seed=0)[0])
    assert out['pred_spans'].device.type == 'cpu' and not calls        # its .cuda() never reached the real one
    assert torch.Tensor.cuda is spy                                    # and the patch ended with the forward


@needs_official
def test_official_model_accepts_our_batches_and_matches_in_eval():
    "The side-by-side feeds the very same batch to both: with converted weights the outputs agree."
    from videolights.convert import load_official as load_ckpt
    cfg = get_preset('qvhighlights_sf_clip', fix_bicmf_mask_order=False)
    off = bench.load_official(OFFICIAL)
    torch.manual_seed(0)
    om = bench.build_official(off, cfg)[0].eval()
    ours = load_ckpt({'model': om.state_dict()}, cfg=cfg).eval()
    mi, _, _ = bench.synth_batch(cfg, B=1, seed=0)  # B=1: the official Bi-CMF mask quirk is then harmless
    with torch.no_grad():
        a, b = ours(**mi), om(**mi)
    for k in ('pred_logits', 'pred_spans', 'saliency_scores'):
        assert torch.allclose(a[k], b[k], atol=1e-4), k


# ------------------------------------------------------------------ speed-ups vs the straightforward versions
def test_vectorised_matcher_equals_per_pair_loops_and_brute_force():
    "One batched (B, Nq, M) cost + one assignment per sample == per-pair Python costs + exhaustive search."
    import itertools
    from videolights.matcher import HungarianMatcher, match_cost, pad_target_spans
    g = torch.Generator().manual_seed(0)
    B, Nq = 4, 5
    logits, spans = torch.randn(B, Nq, 2, generator=g), torch.rand(B, Nq, 2, generator=g) * 0.5 + 0.1
    sizes = [1, 3, 2, 0]
    tl = [dict(spans=torch.rand(n, 2, generator=g) * 0.5 + 0.1) for n in sizes]
    tgt, valid = pad_target_spans(tl)
    C = match_cost(logits, spans, tgt)
    for b in range(B):
        for i in range(Nq):
            p = logits[b, i].softmax(-1)[0]
            (pc, pw) = spans[b, i].tolist()
            for j in range(sizes[b]):
                tc, tw = tl[b]['spans'][j].tolist()
                ps, pe, ts, te = pc - pw / 2, pc + pw / 2, tc - tw / 2, tc + tw / 2
                inter = max(0., min(pe, te) - max(ps, ts)); union = (pe - ps) + (te - ts) - inter
                hull = max(pe, te) - min(ps, ts)
                giou = inter / union - (hull - union) / hull
                ref = 10 * (abs(pc - tc) + abs(pw - tw)) - giou - 4 * float(p)
                assert abs(C[b, i, j].item() - ref) < 1e-5
    out = HungarianMatcher()(dict(pred_logits=logits, pred_spans=spans), dict(span_labels=tl))
    for b, (src, tgt_i) in enumerate(out):
        n = sizes[b]
        best = min(sum(C[b, perm[j], j].item() for j in range(n)) for perm in itertools.permutations(range(Nq), n)) if n else 0.
        assert abs(sum(C[b, s, t].item() for s, t in zip(src.tolist(), tgt_i.tolist())) - best) < 1e-5
        assert len(src) == n


def test_pad_sequences_equals_the_row_copy_loop():
    from videolights.data import pad_sequences
    g = torch.Generator().manual_seed(0)
    seqs = [torch.randn(n, 7, generator=g) for n in (3, 9, 1, 9, 4)]
    ref = torch.zeros(5, 9, 7); mref = torch.zeros(5, 9)
    for i, s in enumerate(seqs): ref[i, :len(s)] = s; mref[i, :len(s)] = 1
    out, m = pad_sequences(seqs)
    assert torch.equal(out, ref) and torch.equal(m, mref) and out.dtype == torch.float32
    out, _ = pad_sequences([torch.tensor([1, 2]), torch.tensor([3])])  # int input -> float32 as before
    assert out.dtype == torch.float32 and out.tolist() == [[1., 2.], [3., 0.]]


# ------------------------------------------------------------------ fast CPU dropout (ops.FastDropout) vs F.dropout
from videolights import ops as L


def test_fast_dropout_is_f_dropout_given_the_same_mask(monkeypatch):
    "With torch's own mask substituted, the fast path reproduces F.dropout's output and gradient."
    x = torch.randn(64, 33, requires_grad=True)
    torch.manual_seed(5); ref = torch.nn.functional.dropout(x, 0.3, True)
    mask = (ref != 0).float() / 0.7
    monkeypatch.setattr(L, 'dropout_mask', lambda shape, p, dtype=torch.float32: mask.view(shape).to(dtype))
    y = L.dropout(x, 0.3, True)
    assert torch.allclose(y, ref, rtol=1e-6, atol=0)
    g = torch.randn_like(x)
    (gx_ref,) = torch.autograd.grad(ref, x, g); (gx,) = torch.autograd.grad(y, x, g)
    assert torch.allclose(gx, gx_ref, rtol=1e-6, atol=0)


@pytest.mark.parametrize('p', [0.1, 0.5])
def test_fast_dropout_keep_rate_scale_and_seed(p):
    x = torch.randn(300, 1000)
    torch.manual_seed(0); y = L.dropout(x, p, True)
    keep = (y != 0)
    n = x.numel()
    assert abs(keep.float().mean().item() - (1 - p)) < 5 * (p * (1 - p) / n) ** 0.5
    assert torch.allclose(y[keep], x[keep] / (1 - p), rtol=1e-6)
    torch.manual_seed(0); assert torch.equal(L.dropout(x, p, True), y)  # torch.manual_seed governs it
    assert not torch.equal(L.dropout(x, p, True), y)  # and the generator advances
    assert torch.equal(L.dropout(x, p, False), x)
    # independent decisions: neighbouring elements' keep flags are uncorrelated
    k = keep.float().flatten()
    assert abs(torch.corrcoef(torch.stack([k[:-1], k[1:]]))[0, 1].item()) < 0.01


@pytest.mark.parametrize('p', [0.001, 0.1, 1 - 200.5 / 256, 0.999])
def test_fast_dropout_decisions_are_the_32_bit_rule(p):
    "`ops._keep` draws 8 bits per element and 24 more on ties, and decides exactly u < T on the rebuilt 32-bit u."
    import numpy as np
    n, T = 200_003, L._keep_threshold(p)
    keep = L._keep(np.random.SFC64(np.random.SeedSequence([3, 1])), n, p)
    g = np.random.SFC64(np.random.SeedSequence([3, 1]))
    u = g.random_raw((n + 7) // 8).view(np.uint8)[:n].astype(np.uint64) << np.uint64(24)
    tie = np.flatnonzero((u >> np.uint64(24)) == T >> 24)
    u[tie] |= (g.random_raw((tie.size + 1) // 2).view(np.uint32)[:tie.size] >> np.uint32(8)).astype(np.uint64)
    assert keep.dtype == bool and np.array_equal(keep, u < np.uint64(T)) and tie.size > 0
    assert abs(keep.mean() - T / 2**32) < 5 * (p * (1 - p) / n) ** 0.5


def test_native_dropout_switch(monkeypatch):
    monkeypatch.setattr(L, 'FAST_DROPOUT', False)
    x = torch.randn(50, 40)
    torch.manual_seed(1); a = L.FastDropout(0.2).train()(x)
    torch.manual_seed(1); b = torch.nn.functional.dropout(x, 0.2, True)
    assert torch.equal(a, b)


def test_train_attention_explicit_path_equals_sdpa(monkeypatch):
    "Train-mode attention with dropout on the CPU takes the explicit softmax path; with an all-keep mask it is SDPA."
    torch.manual_seed(0)
    att = L.FastAttention(32, 4, dropout=0.1).train()
    q, k = torch.randn(3, 7, 32), torch.randn(3, 9, 32)
    pad = torch.zeros(3, 9, dtype=torch.bool); pad[1, 6:] = True; pad[2, 3:] = True
    monkeypatch.setattr(L, 'dropout_mask', lambda shape, p, dtype=torch.float32: torch.ones(shape, dtype=dtype))  # keep all
    a, w = att(q, k, k, pad)
    assert w is None
    att.p = 0.  # train mode without dropout: the fused SDPA call
    b, _ = att(q, k, k, pad)
    assert torch.allclose(a, b, atol=1e-6)


def test_model_train_step_with_fast_dropout_is_finite_and_seeded():
    from videolights.model import build_model
    from videolights.loss import build_criterion
    cfg = get_preset('tiny')
    mi, tg, _ = bench.synth_batch(cfg, 4, seed=0)
    losses = []
    for _ in range(2):
        torch.manual_seed(0)
        m, c = L.accelerate(build_model(cfg)).train(), build_criterion(cfg)
        assert isinstance(m.input_vid_proj[0].dropout, L.FastDropout)
        ld = c(m(**mi), tg)
        losses.append(sum(ld[k] * c.weight_dict[k] for k in ld if k in c.weight_dict))
    assert torch.isfinite(losses[0]) and losses[0].item() == losses[1].item()


@pytest.mark.parametrize('w', [0.25, -0.7, 1.3])
def test_prelu_backward_equals_torch(w):
    x = torch.randn(4, 30, 64); x[0, :5] = 0.  # exact zeros take the slope branch, as in torch
    x.requires_grad_(True)
    g = torch.randn_like(x)
    act, ref = L.FastPReLU(), torch.nn.PReLU()
    with torch.no_grad(): act.weight.fill_(w); ref.weight.fill_(w)
    ya, yr = act(x), ref(x)
    assert torch.equal(ya, yr)
    ga = torch.autograd.grad(ya, (x, act.weight), g); gr = torch.autograd.grad(yr, (x, ref.weight), g)
    assert torch.allclose(ga[0], gr[0], rtol=1e-6, atol=1e-7)
    assert torch.allclose(ga[1], gr[1], rtol=1e-5, atol=1e-4)
    assert torch.autograd.gradcheck(lambda a, b: L._PReLUFn.apply(a, b),
                                    (torch.randn(3, 5, dtype=torch.float64, requires_grad=True) + 0.1,
                                     torch.tensor([w], dtype=torch.float64, requires_grad=True)))
    from videolights.layers import make_activation
    assert type(make_activation('prelu')) is torch.nn.PReLU and L.FAST[torch.nn.PReLU] is L.FastPReLU


def _eager_and_compiled():
    "The tiny preset (dropouts 0) eager and under `torch.compile`, with the same weights; and its criterion."
    cfg = get_preset('tiny', input_dropout=0., dropout=0., fra_dropout=0.)
    torch.manual_seed(0)
    eager, crit, _ = bench.build_ours(cfg)
    comp, _, _ = bench.build_ours(cfg, compile=True)
    comp._orig_mod.load_state_dict(eager.state_dict())  # the same weights under the compiled wrapper
    return cfg, eager, comp, crit


@pytest.mark.slow
def test_compiled_model_equals_eager_in_eval():
    "`build_ours(compile=True)` (inductor, dynamic shapes) gives the eager eval outputs within float tolerance."
    from videolights.model import random_inputs
    cfg, eager, comp, _ = _eager_and_compiled()
    for m in (eager, comp): m.eval()
    with torch.no_grad():
        for B, seed in ((1, 0), (3, 1)):  # two batch shapes: dynamic shapes, no wrong reuse of the first graph
            mi = random_inputs(cfg, B, seed=seed)
            a, b = eager(**mi), comp(**mi)
            for k in ('pred_logits', 'pred_spans', 'saliency_scores'):
                torch.testing.assert_close(b[k], a[k], rtol=1e-4, atol=1e-5)


@pytest.mark.slow
def test_compiled_train_step_equals_eager():
    "Training under `torch.compile` (dropouts 0): same weighted loss and gradients as eager."
    cfg, eager, comp, crit = _eager_and_compiled()
    mi, tg, _ = bench.synth_batch(cfg, 3, seed=2)
    for m in (eager, comp): m.train()
    def loss(m):
        torch.manual_seed(5)  # any random choice in the model or the criterion is drawn the same on both sides
        return sum(v * crit.weight_dict[k] for k, v in crit(m(**mi), tg).items() if k in crit.weight_dict)
    la, lb = loss(eager), loss(comp)
    torch.testing.assert_close(lb, la, rtol=1e-4, atol=1e-4)
    la.backward(); lb.backward()
    def grads(m):  # a parameter without a gradient counts as zeros (compiled graphs may return explicit zeros)
        return torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).flatten() for p in m.parameters()])
    torch.testing.assert_close(grads(comp._orig_mod), grads(eager), rtol=1e-3, atol=1e-5)


def test_v_range_sets_the_video_lengths_of_train_step_and_infer(monkeypatch):
    "`v_range=(lo, hi)` reaches `synth_batch`: with lo == hi every video of every batch has that many clips."
    seen, real = [], bench.synth_batch
    def spy(*a, **k):
        out = real(*a, **k); seen.append(out[0]['src_vid_mask'].sum(1).long().tolist()); return out
    monkeypatch.setattr(bench, 'synth_batch', spy)
    r = bench.bench_train_step('tiny', batch=3, steps=1, warmup=0, memory=False, v_range=(7, 7))
    assert r['v_range'] == [7, 7] and seen and all(n == [7, 7, 7] for n in seen)
    seen.clear()
    r = bench.bench_infer('tiny', batches=(2,), runs=1, warmup=0, memory=False, v_range=[5, 5])
    assert r['v_range'] == [5, 5] and seen and all(n == [5, 5] for n in seen)
    seen.clear()
    bench.bench_infer('tiny', batches=(4,), runs=1, warmup=0, memory=False)  # default: the protocol's U[20, 75], capped
    cfg = get_preset('tiny')
    assert seen and all(min(20, cfg.max_v_l) <= x <= min(75, cfg.max_v_l) for n in seen for x in n)


def test_infer_compile_uses_the_inference_compile(monkeypatch):
    "`bench infer --compile` compiles our eval-only model with `accel.compile_inference` (freezing), not the training compile."
    import videolights.accel as M
    seen = []
    monkeypatch.setattr(M, 'compile_inference', lambda m: seen.append(type(m).__name__) or m.eval())
    r = bench.bench_infer('tiny', batches=(1,), runs=1, warmup=0, memory=False, compile=True)
    assert seen == ['FastVideoLights'] and r['compile'] is True and r['b1']['ours']['ms'] > 0
    seen.clear(); bench.bench_infer('tiny', batches=(1,), runs=1, warmup=0, memory=False)
    assert seen == []  # eager unless asked


def test_infer_cuda_graphs_times_the_graphed_forward(monkeypatch):
    "`bench infer --cuda-graphs` times `GraphedInference` (here on the CPU: its padded static forward), autocast inside."
    import videolights.accel as M
    calls = []
    real = M.GraphedInference.__call__
    monkeypatch.setattr(M.GraphedInference, '__call__', lambda self, **kw: calls.append(self.amp_dtype) or real(self, **kw))
    r = bench.bench_infer('tiny', batches=(1, 2), runs=2, warmup=1, memory=False, cuda_graphs=True)
    assert r['cuda_graphs'] is True and r['b1']['ours']['ms'] > 0 and r['b2']['ours']['ms'] > 0
    assert len(calls) == 3 + 4 and set(calls) == {None}  # batch 1: 1 warm-up + 2 runs; batch 2: 1 + max(3, 2 // 2)
    assert run_main(['infer', '--cuda-graphs'])[0] == 2


def test_train_step_cuda_graphs_alternates_two_shapes_captured_in_warmup(monkeypatch):
    "`bench train-step --cuda-graphs` wraps ours in `GraphedTraining` and feeds it 2 alternating shapes, new data each step."
    import videolights.accel as M
    seen = []
    real = M.GraphedTraining.forward
    monkeypatch.setattr(M.GraphedTraining, 'forward', lambda self, **kw: seen.append((tuple(kw['src_vid'].shape), tuple(kw['src_txt'].shape),
                                                                                      float(kw['src_vid'].sum()))) or real(self, **kw))
    r = bench.bench_train_step('tiny', batch=3, steps=3, warmup=0, memory=False, cuda_graphs=True)
    assert r['cuda_graphs'] is True and r['warmup'] == 2 and len(seen) == 5 and r['ours']['step_ms'] > 0
    shapes = [s[:2] for s in seen]
    assert shapes[0::2] == [shapes[0]] * 3 and shapes[1::2] == [shapes[1]] * 2 and shapes[0] != shapes[1]
    assert len({s[2] for s in seen}) == 5  # new data every step


def test_ours_is_accelerated_unless_plain_model(monkeypatch):
    "Our side runs the fast layers of `ops` by default; `--plain-model` gives the plain model of `07_model`."
    cfg = get_preset('tiny')
    assert L.is_accelerated(bench.build_ours(cfg)[0]) and not L.is_accelerated(bench.build_ours(cfg, accelerate=False)[0])
    seen = []
    monkeypatch.setitem(bench.BENCHES, 'infer', lambda **kw: seen.append(kw.get('accelerate', True)) or {'ok': 1})
    assert run_main(['infer'])[0] == 0 and run_main(['infer', '--plain-model'])[0] == 0
    assert seen == [True, False]


def test_bf16_side_is_interleaved_and_reported():
    "`also_bf16`: our model under bf16 autocast is a third side of train-step and infer, with its speed-up."
    r = bench.bench_train_step('tiny', batch=2, steps=2, warmup=0, memory=False, also_bf16=True)
    assert len(r['ours_bf16']['step_ms_all']) == 2 and r['bf16_speedup'] > 0 and 'ratio_bf16' not in r
    i = bench.bench_infer('tiny', batches=(1, 2), runs=2, warmup=0, memory=False, also_bf16=True)
    assert all(i[f'b{B}']['ours_bf16']['ms'] > 0 and i[f'b{B}']['bf16_speedup'] > 0 for B in (1, 2))


def test_bench_load_small(tmp_path):
    "Two passes over one dataset per side: the first reported on its own, the epoch figure from the later one."
    r = bench.bench_load(n_videos=12, batch=4, repeats=2, workdir=str(tmp_path))
    assert r['n_videos'] == 12 and r['ours_h5']['epoch_s'] > 0 and r['ours_npz']['epoch_s'] > 0
    for k in ('ours_h5', 'ours_npz'):
        first, later = r[k]['all_s']
        assert r[k]['epoch_s'] == later and abs(r[k]['first_pass_ms_per_batch'] - first / 3 * 1e3) < 1  # 3 batches
    assert list(tmp_path.iterdir()) == []  # the temporary folder is removed


def test_bench_predict_small():
    r = bench.bench_predict(duration=60, n_queries=3, repeats=1)
    assert r['n_clips'] == 30 and r['n_windows'] == 1 and r['per_query_ms'] > 0


def test_startup_and_eval_processes():
    "`startup` times `videolights --help`; `eval` times our metrics warm and as a process that imports no torch."
    s = bench.bench_startup(repeats=1)
    assert s['help_s'] > 0 and s['imports_torch'] is False
    e = bench.bench_eval(repeats=1, official=OFFICIAL, mem_copies=2)
    assert e['n_queries'] == 1550 and e['process']['imports_torch'] is False and e['process']['ours_s'] > 0
    assert e['memory']['n_queries'] == 3100 and 0 < e['memory']['peak_rss_mib'] < 1500
    if HAVE_OFFICIAL:
        assert e['mismatches'] == [] and e['process']['mismatches'] == [] and e['process']['ratio'] > 0


def test_phase_timer_adds_up(tmp_path):
    "The epoch benchmark's timer: every phase of a pretend run, and `other` closes the sum to the wall time."
    child = bench._PHASE_TIMER + """
lin = torch.nn.Linear(4, 2)
opt = torch.optim.AdamW(lin.parameters())
class SetCriterion(torch.nn.Module):
    def forward(self, x): return x.sum()
class Evaluator:
    def __call__(self): return lin(torch.randn(2, 4))
_wrap_eval(Evaluator, '__call__')
crit = SetCriterion()
for xb in torch.utils.data.DataLoader(torch.randn(8, 4), batch_size=4):
    opt.zero_grad()
    crit(lin(xb)).backward()
    torch.nn.utils.clip_grad_norm_(lin.parameters(), 0.1)
    opt.step()
Evaluator()()
torch.save(lin.state_dict(), sys.argv[2])
_dump(sys.argv[1])
"""
    subprocess.run([sys.executable, '-c', child, str(tmp_path/'p.json'), str(tmp_path/'w.pt')], check=True)
    d = json.loads((tmp_path/'p.json').read_text())
    assert set(d['phases']) == {'loading', 'forward', 'losses', 'backward', 'optimiser', 'evaluation',
                                'evaluation.forward', 'writing'}
    t = bench._phase_table(d, wall=d['child_s'] + 0.5)
    assert abs(sum(t['phases_s'].values()) - (d['child_s'] + 0.5)) < 0.05
    assert 0.5 < t['phases_s']['startup'] < 0.5 + d['child_s'] and d['first_batch_s'] > 0
    assert set(t['evaluation_s']) == {'forward', 'other'}


def test_official_epoch_child_hides_its_stand_ins(tmp_path):
    """The official epoch child stubs a missing pandas only while the official modules are imported: training and
    the worker processes of its evaluation see no fake pandas (scikit-learn would take it for the real one)."""
    root = tmp_path/'official'
    (root/'video_lights').mkdir(parents=True)
    (root/'utils').mkdir()
    (root/'pandas.py').write_text("raise ImportError('no pandas in this environment')\n")
    (root/'utils'/'basic_utils.py').write_text(
        "import pandas as pd\ndef dict_to_markdown(d, max_str_len=120): return pd.DataFrame(d)\n")
    (root/'video_lights'/'config.py').write_text("from utils.basic_utils import dict_to_markdown\n")
    (root/'video_lights'/'inference.py').write_text("def eval_epoch(*a): pass\ndef eval_submission(*a): pass\n")
    (root/'video_lights'/'train.py').write_text("""
import sys, json, multiprocessing as mp
from utils.basic_utils import dict_to_markdown
from video_lights.inference import eval_epoch
def _has_pandas(_): return 'pandas' in sys.modules
def start_training():
    with mp.get_context('fork').Pool(2) as pool: workers = pool.map(_has_pandas, range(2))
    table = dict_to_markdown({'a': 1, 'b': 2})
    json.dump(dict(main='pandas' in sys.modules, workers=workers, table=table), open(sys.argv[1], 'w'))
""")
    seen, phases = tmp_path/'seen.json', tmp_path/'phases.json'
    subprocess.run([sys.executable, '-c', bench._OFFICIAL_EPOCH, str(phases), json.dumps([str(seen)]), str(root)],
                   cwd=root, check=True)
    assert json.loads(seen.read_text()) == dict(main=False, workers=[False, False], table='a: 1\nb: 2')
    assert 'phases' in json.loads(phases.read_text())


@pytest.mark.slow
def test_bench_epoch_runs_both_processes(tmp_path):
    "A tiny epoch through `videolights train` (and the official train.py when present), with phases and metrics."
    r = bench.bench_epoch(n_train=40, n_val=12, official=OFFICIAL, workers=0, workdir=str(tmp_path), cuda_graphs=True)
    assert 'error' not in r, r.get('error')
    assert r['steps'] == 2 and r['ours']['wall_s'] > 0 and r['ours']['brief'] is not None
    # the options each of our runs recorded: eager, and `--cuda-graphs` (on a CPU its evaluation warns and runs eager)
    assert r['ours']['options']['cuda_graphs'] is False and r['ours']['options']['accelerate'] is True
    assert r['ours_graphs']['options']['cuda_graphs'] is True and r['ours_graphs']['brief'] is not None
    assert r['ours']['phases_s']['forward'] > 0 and r['ours']['phases_s']['evaluation'] > 0
    assert r['ours']['phases_s']['writing'] > 0      # checkpoints
    if HAVE_OFFICIAL:
        assert r['official']['phases_s']['evaluation'] > 0 and r['official']['brief'] is not None and r['ratio'] > 0
        assert r['ratio_graphs'] > 0 and 'options' not in r['official']
    assert list(tmp_path.iterdir()) == []


def _accelerated(seed=0):
    from videolights.config import VLConfig
    from videolights.model import build_model
    torch.manual_seed(seed)
    return L.accelerate(build_model(VLConfig())).eval()


def _batch(B, lv, seed=1):
    from videolights.config import VLConfig
    from videolights.model import random_inputs
    return random_inputs(VLConfig(), B=B, lv=[lv] * B, lq=[12] * B, seed=seed)


def test_cpu_bf16_inference_with_weights_cast_once_equals_autocast(monkeypatch):
    "`ops.lowp` hands out the cast autocast would make: every output is the same bit for bit, also after an update."
    m, big = _accelerated(), _batch(14, 75)
    assert int(big['src_vid_mask'].sum()) >= L.BF16_MIN_ROWS
    def run():
        with torch.no_grad(), torch.autocast('cpu', torch.bfloat16): return m(**big)
    def same(a, b):
        keys = [k for k, v in a.items() if torch.is_tensor(v)]
        assert keys and all(torch.equal(a[k], b[k]) for k in keys)
    cached = run()
    assert cached['pred_logits'].dtype == torch.bfloat16 and len(L._LOWP) > 50  # bf16, most weights cast once
    with monkeypatch.context() as mp_:
        mp_.setattr(L, 'lowp', lambda w: w)  # autocast casts every weight on every call
        same(cached, run())
        with torch.no_grad():
            for p in m.parameters(): p.mul_(1.5)  # in place, as an optimiser step: new versions
        fresh = run()
    same(run(), fresh)
    assert not torch.equal(fresh['pred_logits'], cached['pred_logits'])


def test_cpu_bf16_inference_of_a_small_batch_runs_float32(monkeypatch):
    "Fewer real clips than `BF16_MIN_ROWS`: the float32 forward, bit for bit; training under autocast is untouched."
    m, small = _accelerated(), _batch(2, 40)
    with torch.no_grad():
        ref = m(**small)
        with torch.autocast('cpu', torch.bfloat16): low = m(**small)
        assert low['pred_logits'].dtype == torch.float32 and torch.equal(low['pred_logits'], ref['pred_logits'])
        monkeypatch.setattr(L, 'BF16_MIN_ROWS', 0)
        with torch.autocast('cpu', torch.bfloat16): assert m(**small)['pred_logits'].dtype == torch.bfloat16
    m.train()
    L._LOWP.clear()
    with torch.autocast('cpu', torch.bfloat16): out = m(**small)
    assert out['pred_logits'].dtype == torch.bfloat16 and len(L._LOWP) == 0  # autograd records: no cached casts
    out['pred_logits'].float().sum().backward()
    assert m.class_embed.weight.grad is not None and m.class_embed.weight.grad.abs().sum() > 0
    assert not L.float32_is_faster(small['src_vid_mask'])  # autocast off


def test_cpu_bf16_row_buckets_change_no_value(monkeypatch):
    "bf16 products on rows padded to `ROW_BUCKET`: inference bit for bit as unpadded, training gradients to rounding."
    from videolights.config import VLConfig
    from videolights.model import build_model, random_inputs
    m, big = _accelerated(), _batch(14, 75)  # 1050 real clips: not a multiple of 128
    assert int(big['src_vid_mask'].sum()) >= L.BF16_MIN_ROWS
    pads, real_pad = [], torch.nn.functional.pad
    monkeypatch.setattr(torch.nn.functional, 'pad', lambda x, p, *a, **k: pads.append(p) or real_pad(x, p, *a, **k))
    def run(model, inp):
        with torch.no_grad(), torch.autocast('cpu', torch.bfloat16): return model(**inp)
    padded = run(m, big)
    assert len(pads) > 10 and all(p[:3] == (0, 0, 0) and 0 < p[3] < L.ROW_BUCKET for p in pads)
    monkeypatch.setattr(L, 'ROW_BUCKET', 0)
    n, unpadded = len(pads), run(m, big)
    assert len(pads) == n  # no padding with the buckets off
    keys = [k for k, v in padded.items() if torch.is_tensor(v)]
    assert keys and all(torch.equal(padded[k], unpadded[k]) for k in keys)
    cfg = VLConfig(dropout=0., input_dropout=0., fra_dropout=0.)
    torch.manual_seed(0)
    tm = L.accelerate(build_model(cfg)).train()
    inp = random_inputs(cfg, B=4, lv=[20, 75, 33, 50], lq=[5, 16, 3, 9], seed=2)
    def grads(bucket):
        monkeypatch.setattr(L, 'ROW_BUCKET', bucket)
        tm.zero_grad()
        with torch.autocast('cpu', torch.bfloat16): out = tm(**inp)
        (out['pred_logits'].float().sum() + out['saliency_scores'].float().square().sum()).backward()
        return {k: p.grad.clone() for k, p in tm.named_parameters() if p.grad is not None}
    g128, g0 = grads(128), grads(0)
    assert g128.keys() == g0.keys() and len(g0) > 50
    for k in g0: torch.testing.assert_close(g128[k], g0[k], rtol=2e-2, atol=2e-2 * float(g0[k].abs().max()) + 1e-6)
