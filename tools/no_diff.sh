#!/usr/bin/env bash
# Run a command and fail if it changed the working tree (tracked or untracked files).
# Compares the tree before and after, so it works in a dirty checkout as well as in CI.
set -euo pipefail
snap() { { git diff HEAD --binary; git ls-files --others --exclude-standard -z | xargs -0 -r sha1sum; } | sha1sum; }
before=$(snap)
"$@"
after=$(snap)
if [ "$before" != "$after" ]; then
  echo "ERROR: '$*' changed the working tree; run it and commit the result:" >&2
  git status --short >&2
  exit 1
fi
echo "ok: '$*' left no diff"
