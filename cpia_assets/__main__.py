"""`python -m cpia_assets ...`: the manifest command line (see cpia_assets.cli)."""

from cpia_assets.cli import main

raise SystemExit(main())
