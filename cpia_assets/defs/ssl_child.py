"""The training process the `ssl_checkpoint` asset starts (`python -m` or under torchrun): the
core's training entry point, with rank 0 reporting its progress to the asset through Dagster
Pipes. The training itself stays in `cpia_assets.core.training.ssl.train`, free of Dagster."""

from __future__ import annotations

import os
import sys
from pathlib import Path

from cpia_assets.core.training.ssl import train
from cpia_assets.core.training.ssl.runlock import training_process


def main() -> int:
    if len(sys.argv) != 2:
        return train.main()  # says how to call it
    with training_process(Path(sys.argv[1]).parent):  # dies with the asset that started it
        if not os.environ.get("DAGSTER_PIPES_CONTEXT") or int(os.environ.get("RANK", "0")) != 0:
            return train.main()
        from dagster_pipes import open_dagster_pipes

        with open_dagster_pipes() as pipes:
            return train.main(progress=pipes.log.info)


if __name__ == "__main__":
    raise SystemExit(main())
