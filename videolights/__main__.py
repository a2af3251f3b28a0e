"Run the `videolights` command line: `python -m videolights SUBCOMMAND ...` (hand-written, not exported)."
from videolights.cli import main
if __name__ == "__main__": raise SystemExit(main())
