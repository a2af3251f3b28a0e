#!/usr/bin/env bash
# Make a scratch copy of the official VideoLights code (github.com/dpaul06/VideoLights) and a Python environment
# that runs it on a CPU, for the side-by-side checks in tools/ and tests/. Nothing official enters this repository:
# the sources go to DEST, and the checks import them from there at run time (tools/official/official_harness.py).
#
#   bash tools/official/setup.sh SOURCE [DEST]
#
#   SOURCE  a git directory of the official repository (bare or with a work tree), or a URL git can clone
#   DEST    the folder to fill (default: $VIDEOLIGHTS_OFFICIAL_HOME, else .official in this repository, git-ignored)
#
# Environment: OFFICIAL_REV (default the commit this project was compared with, 76308bb), TORCH_SPEC (default
# torch==2.13.0), PYTHON (the interpreter that makes the venv, default python3), NO_VENV=1 (sources only).
#
# DEST/official  the sources of OFFICIAL_REV (only the folders the checks use; LFS data files stay pointers)
# DEST/venv      torch, numpy, scipy, scikit-learn (the official evaluator), tqdm (the official loops)
# It ends by printing the two variables the checks read:
#   export VIDEOLIGHTS_OFFICIAL=DEST/official VIDEOLIGHTS_OFFICIAL_PY=DEST/venv/bin/python
set -euo pipefail
SOURCE=${1:?usage: bash tools/official/setup.sh SOURCE [DEST]  (SOURCE: git dir or URL of dpaul06/VideoLights)}
REPO_ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
DEST=${2:-${VIDEOLIGHTS_OFFICIAL_HOME:-$REPO_ROOT/.official}}
REV=${OFFICIAL_REV:-76308bb0ad007981bd58f393ad0bbb8f07720953}
TORCH_SPEC=${TORCH_SPEC:-torch==2.13.0}
PYTHON=${PYTHON:-python3}
mkdir -p "$DEST"
DEST=$(cd "$DEST" && pwd)

# 1) a git directory holding REV: SOURCE itself, or a bare clone of the URL under DEST
if git --git-dir="$SOURCE" rev-parse --git-dir >/dev/null 2>&1; then
  GIT_DIR=$SOURCE
elif git -C "$SOURCE" rev-parse --git-dir >/dev/null 2>&1; then
  GIT_DIR=$(git -C "$SOURCE" rev-parse --absolute-git-dir)
else
  GIT_DIR=$DEST/repo.git
  [ -d "$GIT_DIR" ] || GIT_LFS_SKIP_SMUDGE=1 git clone --bare --quiet "$SOURCE" "$GIT_DIR"
fi
git --git-dir="$GIT_DIR" cat-file -e "$REV^{commit}" 2>/dev/null \
  || { echo "setup.sh: $SOURCE does not hold commit $REV (set OFFICIAL_REV to use another)" >&2; exit 2; }

# 2) the sources, folder by folder (a partial snapshot may lack blobs of large files elsewhere in the tree)
if [ ! -f "$DEST/official/video_lights/model.py" ] || [ "$(cat "$DEST/official/OFFICIAL_COMMIT" 2>/dev/null)" != "$(git --git-dir="$GIT_DIR" rev-parse "$REV^{commit}")" ]; then
  rm -rf "$DEST/official"
  mkdir -p "$DEST/official"
  for p in video_lights utils standalone_eval extract_feature run_on_video data requirements.txt README.md; do
    git --git-dir="$GIT_DIR" archive "$REV" "$p" 2>/dev/null | tar -x -C "$DEST/official" \
      || echo "setup.sh: note: $p not copied (absent or incomplete in $SOURCE)" >&2
  done
  git --git-dir="$GIT_DIR" rev-parse "$REV^{commit}" > "$DEST/official/OFFICIAL_COMMIT"
fi
[ -f "$DEST/official/video_lights/train.py" ] || { echo "setup.sh: $DEST/official/video_lights/train.py missing" >&2; exit 2; }
echo "official sources @ $(cat "$DEST/official/OFFICIAL_COMMIT") in $DEST/official"

# 3) the environment (CPU torch; pandas/torchtext/fvcore/tensorboard are stubbed by the harness)
PY=$DEST/venv/bin/python
if [ "${NO_VENV:-0}" != 1 ]; then
  [ -x "$PY" ] || "$PYTHON" -m venv "$DEST/venv"
  "$PY" -m pip install -q "$TORCH_SPEC" numpy scipy scikit-learn tqdm
  "$PY" -c "import torch, numpy, scipy, sklearn, tqdm; print('official venv: torch', torch.__version__, 'numpy', numpy.__version__)"
fi
echo "export VIDEOLIGHTS_OFFICIAL=$DEST/official VIDEOLIGHTS_OFFICIAL_PY=$PY"
