import os
from pathlib import Path

import torch

torch.set_num_threads(2)

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("LIGHTNING_METRIC_DATA", REPO.parent / "shared" / "data"))
if not (SHARED_DATA / "fashion-mnist").is_dir():
    raise RuntimeError(
        f"the test data is missing: expected {SHARED_DATA / 'fashion-mnist'} (the workplace's "
        "shared/data next to the repository). Set LIGHTNING_METRIC_DATA to the folder holding "
        "fashion-mnist/."
    )
