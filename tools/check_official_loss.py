"""Check that videolights' criterion gives the official VideoLights loss values on the same outputs and targets.

    python tools/check_official_loss.py [--official CHECKOUT] [--epochs 0 5] [--B 4]
                                        [--save-fixture tests/fixtures/loss_official_qvh.pt] [--json OUT.json]

For each QVHighlights variant (sf_clip, sf_clip_blip) the official model (random weights, train mode) runs on a
synthetic official batch; its output dict and the batch targets go, detached, into both the official SetCriterion
and ours (`videolights.loss.build_criterion` on the matching preset). Every loss key is compared for several cases
(official recipe; without hard pos/neg; without the MR->HD term; TVSum mode) and epochs, as are the Hungarian
matches of every decoder layer, the weight dicts, and the gradients of the weighted total w.r.t. every output
tensor. Exit status 1 if anything differs by more than --tol (relative to max(1, |official value|)).

No official code is in this file: it is imported at run time from a scratch checkout (--official, else
$VIDEOLIGHTS_OFFICIAL; made by tools/official/setup.sh) through tools/official/official_harness.py.
--save-fixture writes the detached outputs, targets, matches and official loss values (plain tensors, loadable with
weights_only=True) for tests/test_loss.py.
"""
from __future__ import annotations
import argparse, json, os, sys
from pathlib import Path
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent / 'official'))
import official_harness as vo  # noqa: E402

CASES = {  # name: (attributes set on the official criterion, VLConfig overrides for ours)
    'official': ({}, {}),
    'no_hard_pos_neg': (dict(hard_pos_neg_loss=False), dict(hard_pos_neg_loss=False)),
    'no_mr_to_hd': (dict(mr_to_hd_loss=False), dict(mr_to_hd_loss=False)),
    'tvsum_mode': (dict(use_matcher=False), dict(use_matcher=False)),
}
PRESET = {'sf_clip': 'qvhighlights_sf_clip', 'sf_clip_blip': 'qvhighlights'}


def detach_outputs(out: dict) -> dict:
    "Plain detached copies of the model output dict (aux_outputs kept as a list of dicts)."
    res = {k: v.detach().clone() for k, v in out.items() if torch.is_tensor(v)}
    if 'aux_outputs' in out: res['aux_outputs'] = [detach_outputs(a) for a in out['aux_outputs']]
    return res


def leaf_outputs(out: dict) -> dict:
    "Copies of the float outputs that require grad (masks excluded)."
    res = {k: (v.clone().requires_grad_() if k != 'video_mask' else v.clone()) for k, v in out.items() if torch.is_tensor(v)}
    if 'aux_outputs' in out: res['aux_outputs'] = [leaf_outputs(a) for a in out['aux_outputs']]
    return res


def grads_of(out: dict, prefix: str = '') -> dict:
    res = {prefix + k: v.grad for k, v in out.items() if torch.is_tensor(v) and v.requires_grad}
    for i, a in enumerate(out.get('aux_outputs', [])): res.update(grads_of(a, f'{prefix}aux{i}.'))
    return res


def rel_diff(a: float, b: float) -> float:
    return abs(a - b) / max(1.0, abs(b))


def official_outputs(off, vo, variant: str, B: int, seed: int):
    "Official model outputs (train mode, random weights) and targets for a synthetic official batch."
    opt = vo.make_opt(off, variant)
    vo.set_seed(seed)
    model, crit, _ = vo.build(off, opt)
    model.train()
    mi, targets, lengths = vo.synth_batch(off, opt, variant, B, seed, v_range=(10, 30), q_range=(4, 12))
    with torch.no_grad(): out = model(**mi)
    return opt, crit, detach_outputs(out), targets, lengths


def compare_variant(off, vo, variant: str, epochs: list[int], B: int, seed: int, tol: float) -> dict:
    from videolights.config import get_preset
    from videolights.loss import build_criterion, total_loss
    opt, ocrit, out, targets, lengths = official_outputs(off, vo, variant, B, seed)
    rep = dict(variant=variant, lengths=lengths, cases={}, ok=True)
    ours0 = build_criterion(get_preset(PRESET[variant]))
    # weight dicts
    rep['weight_dict_equal'] = {k: float(v) for k, v in ocrit.weight_dict.items()} == {k: float(v) for k, v in ours0.weight_dict.items()}
    rep['ok'] &= rep['weight_dict_equal']
    # matches of every layer
    layers = [out] + out.get('aux_outputs', [])
    rep['matches_equal'] = all(all(torch.equal(a, b) for pa, pb in zip(ocrit.matcher(o, targets), ours0.matcher(o, targets))
                                   for a, b in zip(pa, pb)) for o in layers)
    rep['ok'] &= rep['matches_equal']
    fixture = dict(outputs=out, targets=targets, lengths=lengths, losses={},
                   indices=[ours0.matcher(o, targets) for o in layers], weight_dict=dict(ours0.weight_dict))
    saved = {k: getattr(ocrit, k) for k in ('hard_pos_neg_loss', 'mr_to_hd_loss', 'use_matcher')}
    for case, (off_attrs, overrides) in CASES.items():
        for k, v in off_attrs.items(): setattr(ocrit, k, v)
        ours = build_criterion(get_preset(PRESET[variant], **overrides))
        for ep in epochs:
            lo, oo = leaf_outputs(out), leaf_outputs(out)
            ref = ocrit(lo, targets, epoch_i=ep)
            got = ours(oo, targets, epoch=ep)
            keys = sorted(set(ref) | set(got))
            val = lambda d, k: float(d[k].detach().sum())
            diffs = {k: (rel_diff(val(got, k), val(ref, k)) if k in ref and k in got else float('inf')) for k in keys}
            abs_diff = max((abs(val(got, k) - val(ref, k)) if k in ref and k in got else float('inf')) for k in keys)
            abs_diff_loss = max((abs(val(got, k) - val(ref, k)) if k in ref and k in got else float('inf'))
                                for k in keys if k.startswith('loss'))
            total_ref = sum(ref[k].sum() * ocrit.weight_dict[k] for k in ref if k in ocrit.weight_dict)
            total_got = total_loss(got, ours.weight_dict)
            total_ref.backward(); total_got.backward()
            gr, gg = grads_of(lo), grads_of(oo)
            grad_diff = max(((gg[k] if gg[k] is not None else torch.zeros_like(gr[k])) - gr[k]).abs().max().item()
                            / max(1.0, gr[k].abs().max().item()) for k in gr if gr[k] is not None)
            total_ref, total_got = float(total_ref.detach()), float(total_got.detach())
            ok = max(diffs.values()) <= tol and rel_diff(total_got, total_ref) <= tol and grad_diff <= 1e-4
            rep['ok'] &= ok
            rep['cases'][f'{case}@e{ep}'] = dict(ok=ok, max_rel_diff=max(diffs.values()), max_abs_diff=abs_diff, max_abs_diff_losses=abs_diff_loss,
                                                 grad_max_rel_diff=grad_diff, total_official=total_ref, total_ours=total_got,
                                                 worst_key=max(diffs, key=diffs.get),
                                                 values={k: val(ref, k) for k in ref})
            fixture['losses'][f'{case}@e{ep}'] = {k: val(ref, k) for k in ref}
        for k, v in saved.items(): setattr(ocrit, k, v)
    return rep, fixture


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split('\n\n')[0], epilog="example: OMP_NUM_THREADS=1 "
                                 "python tools/check_official_loss.py --epochs 0 5", formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument('--official', default=None,
                    help='official checkout (default: $VIDEOLIGHTS_OFFICIAL; tools/official/setup.sh)')
    ap.add_argument('--variants', nargs='+', default=['sf_clip', 'sf_clip_blip'], choices=list(PRESET))
    ap.add_argument('--epochs', nargs='+', type=int, default=[0, 5])
    ap.add_argument('--B', type=int, default=4)
    ap.add_argument('--seed', type=int, default=0)
    ap.add_argument('--tol', type=float, default=1e-5)
    ap.add_argument('--save-fixture', default=None, help='write outputs/targets/official losses here (torch.save)')
    ap.add_argument('--json', default=None, help='write the full report here')
    a = ap.parse_args(argv)
    try:
        off = vo.load(a.official)
    except FileNotFoundError as e:
        print(f"check_official_loss: {e}", file=sys.stderr)
        return 2
    reports, fixtures = [], {}
    for i, variant in enumerate(a.variants):
        rep, fx = compare_variant(off, vo, variant, a.epochs, a.B, a.seed + i, a.tol)
        reports.append(rep); fixtures[variant] = fx
        for name, c in rep['cases'].items():
            print(f"{variant:13s} {name:22s} {'ok  ' if c['ok'] else 'FAIL'} max abs diff {c['max_abs_diff']:.2e} rel {c['max_rel_diff']:.2e} "
                  f"({c['worst_key']}; loss_* keys {c['max_abs_diff_losses']:.1e})  grad {c['grad_max_rel_diff']:.2e}  total {c['total_official']:.6f} vs {c['total_ours']:.6f}")
        print(f"{variant:13s} weight_dict equal: {rep['weight_dict_equal']}, matches equal: {rep['matches_equal']}")
    if a.save_fixture:
        torch.save(dict(fixtures=fixtures, epochs=a.epochs, presets=PRESET, official_commit=off.commit), a.save_fixture)
        print(f"fixture written to {a.save_fixture} ({os.path.getsize(a.save_fixture) / 1e6:.2f} MB)")
    if a.json:
        with open(a.json, 'w') as f: json.dump(reports, f, indent=1)
    ok = all(r['ok'] for r in reports)
    print('ALL OK' if ok else 'MISMATCH')
    return 0 if ok else 1


if __name__ == '__main__':
    sys.exit(main())
