"""Progress bars for model load and weight transfer (stderr; quiet when SKYNET_NO_PROGRESS=1)."""
from __future__ import annotations

import os
import sys


class Progress:
    def __init__(self, desc: str, total: int, unit: str = "B"):
        self.bar = None
        if os.environ.get("SKYNET_NO_PROGRESS") != "1":
            from tqdm import tqdm
            self.bar = tqdm(total=total, desc=desc, unit=unit, unit_scale=True, leave=False,
                            file=sys.stderr, mininterval=0.2)

    def update(self, n: int) -> None:
        if self.bar is not None:
            self.bar.update(n)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
