"""Check that `videolights.model.VideoLights` reproduces the official VideoLights model numerically.

The official code is imported at run time from a scratch checkout (`--official`, else $VIDEOLIGHTS_OFFICIAL; made by
`tools/official/setup.sh`) through `tools/official/official_harness.py`; no official code lives in this repository. For each variant the
official model is built on CPU with random weights, its state dict is converted with
`videolights.convert.load_official`, both models run in eval mode on the same batch (official collate, mixed
lengths) and every output is compared. A gradient check (eval mode, random linear surrogate over the outputs)
compares the gradient of every parameter too. Every check runs on our plain model (`build_model`) and on the same
model accelerated with the fast layers of `videolights.ops` (`--models plain fast`, the default: both).

    python tools/check_official_model.py                         # both QVHighlights variants, B=4
    python tools/check_official_model.py --variants sf_clip --B 8 --seed 3
    python tools/check_official_model.py --save-fixture tests/fixtures/official_small.pt   # CI fixture

Exit status 0 when every compared output is within --tol (default 1e-5), 1 otherwise.
"""
from __future__ import annotations
import argparse, json, os, sys
from pathlib import Path

import torch
from torch import nn

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from videolights.config import get_preset, VLConfig  # noqa: E402
from videolights.convert import load_official, official_to_ours_key  # noqa: E402
from videolights.ops import accelerate  # noqa: E402

sys.path.insert(0, str(REPO / 'tools' / 'official'))
import official_harness  # noqa: E402
PRESET = {'sf_clip': 'qvhighlights_sf_clip', 'sf_clip_blip': 'qvhighlights'}
KEYS = ['pred_logits', 'pred_spans', 'saliency_scores', 'saliency_scores_neg', 'saliency_scores_mr',
        'proj_queries', 'proj_txt_mem', 'proj_vid_mem', 'src_vid', 'src_txt']
FIXTURE_FLAGS = ['--v_feat_dim', '32', '--t_feat_dim', '16', '--dim_feedforward', '32', '--enc_layers', '1',
                 '--dec_layers', '2', '--max_q_l', '12', '--max_v_l', '20']
FIXTURE_CFG = dict(v_feat_types=('video',), v_feat_dims=(32,), t_feat_types=('text',), t_feat_dims=(16,),
                   blip_features=False, dim_feedforward=32, enc_layers=1, dec_layers=2, max_q_l=12, max_v_l=20)


def official_lib(official: str | None = None):
    "The harness module and the imported official code (namespace); `official=None` reads $VIDEOLIGHTS_OFFICIAL."
    return official_harness, official_harness.load(official)


def official_model(vo, off, variant: str, extra=(), seed: int = 2018, cmf: str = 'bi', fra: bool = True):
    "An official model (eval mode) with random weights; `cmf='uni'` swaps in the official T2V layer, `fra=False` the no-FRA model."
    opt = vo.make_opt(off, variant, list(extra))
    vo.set_seed(seed)
    if fra:
        model = vo.build(off, opt)[0]
    else:  # the official constructor flag that the CLI does not expose
        tr = off.transformer.build_transformer(opt)
        pe, tpe = off.model.build_position_encoding(opt)
        model = off.model.VideoLight(tr, pe, tpe, txt_dim=opt.t_feat_dim, vid_dim=opt.v_feat_dim, aud_dim=opt.a_feat_dim,
                                     num_queries=opt.num_queries, input_dropout=opt.input_dropout, aux_loss=opt.aux_loss,
                                     mr_to_hd_loss=opt.mr_to_hd_loss, contrastive_align_loss=opt.contrastive_align_loss,
                                     contrastive_hdim=opt.contrastive_hdim, span_loss_type=opt.span_loss_type,
                                     use_txt_pos=opt.use_txt_pos, n_input_proj=opt.n_input_proj,
                                     clip_len=opt.clip_length, fra=False)
    if cmf == 'uni':
        T2V = off.transformer.T2V_TransformerEncoderLayer
        layers = [T2V(opt.hidden_dim, opt.nheads, opt.dim_feedforward, opt.dropout, 'prelu', opt.pre_norm)
                  for _ in range(opt.bicmf_layers)]
        for l in layers:
            for p in l.parameters():
                if p.dim() > 1: nn.init.xavier_uniform_(p)
        model.transformer.t2v_encoder.layers = nn.ModuleList(layers)
    return model.eval(), opt


def _flat(out: dict) -> dict:
    "Output tensors by name, aux outputs as aux{i}.{key}."
    flat = {k: out[k] for k in KEYS if k in out}
    for i, a in enumerate(out.get('aux_outputs', [])):
        flat.update({f'aux{i}.{k}': v for k, v in a.items() if k in ('pred_logits', 'pred_spans', 'proj_queries')})
    return flat


VID_KEYS, TXT_KEYS = ('saliency_scores', 'saliency_scores_neg', 'saliency_scores_mr', 'proj_vid_mem', 'src_vid'), \
    ('proj_txt_mem', 'src_txt')


def compare_outputs(o_off: dict, o_us: dict, inputs: dict | None = None) -> dict:
    """Max abs difference per output present in both. With `inputs`, per-clip / per-token outputs are compared on
    valid positions only (the official model does not mask its per-clip and per-token outputs at padded positions, as
    running it shows; there the values are large, e.g. FRA rows carry log(1e-45), so float rounding grows with them)."""
    a, b = _flat(o_off), _flat(o_us)
    out = {}
    for k in a:
        if k not in b: continue
        x, y = a[k].float(), b[k].float()
        if inputs is not None and k in VID_KEYS + TXT_KEYS:
            m = inputs['src_vid_mask' if k in VID_KEYS else 'src_txt_mask'].bool()
            x, y = x[m], y[m]
        out[k] = float((x - y).abs().max())
    return out


def compare_grads(m_off, m_us, inputs: dict, seed: int = 0) -> dict:
    """Gradient agreement (eval mode) under the same random linear surrogate of the outputs: the max abs difference,
    the max of |diff| / max(max|g_param|, 1e-3 * max|g_model|), and the fraction of gradient entries within
    1e-5 * max|g_model| + 1e-3 * |g|. Kinks (PReLU/ReLU at ~0, floor in the MR->HD slice) turn 1e-7 forward
    differences into O(1) gradient differences on single rows, so the fraction is the robust criterion."""
    g = torch.Generator().manual_seed(seed)
    grads = []
    for m in (m_off, m_us):
        m.zero_grad()
        flat = _flat(m(**inputs))
        loss = 0.
        g.manual_seed(seed)
        for k in sorted(flat):
            w = torch.randn(flat[k].shape, generator=g)
            loss = loss + (flat[k] * w).sum()
        loss.backward()
        grads.append({n: p.grad for n, p in m.named_parameters() if p.grad is not None})
    g_off, g_us = grads
    G = max(float(g.abs().max()) for g in g_off.values())
    worst, worst_rel, n_close, n_all = 0., 0., 0, 0
    for n, gr in g_off.items():
        ours = g_us.get(official_to_ours_key(n))
        if ours is None:
            if float(gr.abs().max()) > 1e-6 * G:  # ours computes none where it is zero in exact arithmetic (folded keys)
                raise AssertionError(f"official parameter {n} has a gradient, ours none")
            continue
        diff = (gr.reshape(ours.shape) - ours).abs()
        d = float(diff.max())
        worst, worst_rel = max(worst, d), max(worst_rel, d / max(float(gr.abs().max()), 1e-3 * G))
        n_close += int((diff <= 1e-5 * G + 1e-3 * gr.reshape(ours.shape).abs()).sum()); n_all += diff.numel()
    extra = [n for n in g_us if n not in {official_to_ours_key(k) for k in g_off} and float(g_us[n].abs().max()) > 0]
    if extra: raise AssertionError(f"our parameters with a gradient the official ones lack: {extra[:5]}")
    return dict(grad_max_abs_diff=worst, grad_max_rel_diff=worst_rel, grad_max_abs=G, grad_frac_close=n_close / n_all)


def check_variant(vo, off, variant: str, B: int = 4, seed: int = 0, fix_mask: bool = False, cmf: str = 'bi',
                  fra: bool = True, grads: bool = True, fast: bool = False) -> dict:
    "Build both models for `variant` (ours accelerated with `fast`), run them on one official batch; return diffs."
    m_off, opt = official_model(vo, off, variant, cmf=cmf, fra=fra, seed=2018 + seed)
    if fix_mask: vo.fix_bicmf_mask_order(m_off)
    cfg = get_preset(PRESET[variant], loss_outputs_eval=True, fix_bicmf_mask_order=fix_mask, cmf=cmf, use_fra=fra)
    m_us = load_official(m_off.state_dict(), cfg)
    if fast: accelerate(m_us)
    inputs, _, lengths = vo.synth_batch(off, opt, variant, B, seed)
    with torch.no_grad():
        o_off, o_us = m_off(**inputs), m_us(**inputs)
    diffs, diffs_all = compare_outputs(o_off, o_us, inputs), compare_outputs(o_off, o_us)
    res = dict(variant=variant, model='fast' if fast else 'plain', cmf=cmf, fra=fra, fix_bicmf_mask_order=fix_mask, B=B,
               lengths=lengths, diffs=diffs,
               max_diff_all_positions=max(diffs_all.values()),
               params_official=sum(p.numel() for p in m_off.parameters()),
               params_ours=sum(p.numel() for p in m_us.parameters()))
    if grads: res.update(compare_grads(m_off, m_us, inputs))
    return res


def check_export(vo, off, variant: str = 'sf_clip', B: int = 4, seed: int = 0, fast: bool = False) -> dict:
    "Our randomly initialised model -> `to_official_state_dict` -> official model (strict load): same outputs."
    from videolights.convert import to_official_state_dict
    from videolights.model import build_model
    m_off, opt = official_model(vo, off, variant, seed=2018 + seed)
    torch.manual_seed(seed)
    m_us = build_model(get_preset(PRESET[variant], loss_outputs_eval=True)).eval()
    if fast: accelerate(m_us)
    m_off.load_state_dict(to_official_state_dict(m_us), strict=True)
    inputs, _, _ = vo.synth_batch(off, opt, variant, B, seed)
    with torch.no_grad():
        diffs = compare_outputs(m_off(**inputs), m_us(**inputs), inputs)
    return dict(variant=variant, model='fast' if fast else 'plain', export_diffs=diffs)


def quantize(sd: dict) -> tuple[dict, dict, dict]:
    "int8 weights with a per-tensor scale (the fixture stores these; dequantised values are exact in float32)."
    q, scale, other = {}, {}, {}
    for k, v in sd.items():
        if not v.is_floating_point():
            other[k] = v
            continue
        s = float(v.abs().max()) / 127 or 1.
        q[k] = (v / s).round().clamp(-127, 127).to(torch.int8)
        scale[k] = torch.tensor(s, dtype=torch.float32)
    return q, scale, other


def dequantize(q: dict, scale: dict, other: dict) -> dict:
    "Float32 state dict from `quantize`'s output."
    return {**{k: q[k].float() * scale[k] for k in q}, **other}


def make_fixture(vo, off, path: str, B: int = 3, seed: int = 0) -> dict:
    "Save a small official model (int8-quantised random weights), inputs and official eval outputs to `path`."
    from videolights.model import random_inputs
    m_off, opt = official_model(vo, off, 'sf_clip', extra=FIXTURE_FLAGS, seed=2018 + seed)
    q, scale, other = quantize(m_off.state_dict())
    m_off.load_state_dict(dequantize(q, scale, other))
    cfg = get_preset('qvhighlights', **FIXTURE_CFG)
    inputs = random_inputs(cfg, B=B, lv=[20, 13, 7][:B], lq=[5, 12, 3][:B], seed=seed)
    with torch.no_grad():
        out = _flat(m_off(**inputs))
    fx = dict(format=1, official_commit=off.commit or '', cfg=json.loads(json.dumps(FIXTURE_CFG)), preset='qvhighlights',
              q=q, scale=scale, other=other, inputs=inputs, outputs=out)
    torch.save(fx, path)
    return dict(path=path, bytes=os.path.getsize(path), params=sum(v.numel() for v in q.values()))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0],
                                epilog=__doc__[__doc__.index('    python'):], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--official', default=None, help='official checkout (default: $VIDEOLIGHTS_OFFICIAL)')
    p.add_argument('--variants', nargs='+', default=['sf_clip', 'sf_clip_blip'], choices=list(PRESET))
    p.add_argument('--B', type=int, default=4)
    p.add_argument('--seed', type=int, default=0)
    p.add_argument('--tol', type=float, default=1e-5)
    p.add_argument('--no-extra', action='store_true', help='skip the fixed-mask, uni-CMF and no-FRA runs')
    p.add_argument('--models', nargs='+', default=['plain', 'fast'], choices=['plain', 'fast'],
                   help='our plain model, and/or the same model with the fast layers of videolights.ops')
    p.add_argument('--save-fixture', default=None)
    p.add_argument('--json', default=None)
    a = p.parse_args(argv)
    torch.set_num_threads(int(os.environ.get('OMP_NUM_THREADS', '1')))
    try:
        vo, off = official_lib(a.official)
    except FileNotFoundError as e:
        print(f"check_official_model: {e}", file=sys.stderr)
        return 2
    if a.save_fixture:
        print(json.dumps(make_fixture(vo, off, a.save_fixture)))
        return 0
    runs = [dict(variant=v) for v in a.variants]
    if not a.no_extra:
        runs += [dict(variant='sf_clip', fix_mask=True), dict(variant='sf_clip', cmf='uni'), dict(variant='sf_clip', fra=False)]
    runs = [dict(r, fast=m == 'fast') for m in a.models for r in runs]
    results, ok = [], True
    for m in a.models:
        exp = check_export(vo, off, a.variants[0], B=a.B, seed=a.seed, fast=m == 'fast')
        exp['ok'] = max(exp['export_diffs'].values()) <= a.tol
        ok &= exp['ok']
        print(json.dumps(exp))
    for r in runs:
        res = check_variant(vo, off, B=a.B, seed=a.seed, **r)
        res['ok'] = (max(res['diffs'].values()) <= a.tol and res['params_official'] == res['params_ours']
                     and res.get('grad_frac_close', 1) >= 0.999)  # kinks (PReLU, floor) amplify 1e-7 differences
        ok &= res['ok']
        results.append(res)
        print(json.dumps(res))
    if a.json:
        Path(a.json).write_text(json.dumps(results, indent=1))
    print('official equivalence:', 'OK' if ok else 'FAILED')
    return 0 if ok else 1


if __name__ == '__main__':
    raise SystemExit(main())
