"""What loading images met, counted per process, warned about once.

Every image data set records each decoded file's `LoadInfo` (fae.data.pixels) in the process-wide `TALLY`, once per
file (fae.data.images.DecodedImages.load):
converted modes, images with alpha, images whose content the background hides, huge images (with the decode
seconds of the slowest), warnings the imaging library raised while opening them, and dropped unreadable files.
A condition worth acting on (hidden content, huge images, library warnings) is warned about ONCE per process and
kind, naming the first file and pointing to `fae data preview`, which counts them all; later ones are only counted.
DataLoader workers are processes of their own: each keeps (and warns from) its own tally.
"""
from __future__ import annotations

import heapq
import warnings
from collections import Counter
from typing import Any

from fae.data.pixels import LoadInfo

SLOWEST_KEPT = 10      # huge images whose decode seconds are kept
NAMES_SHOWN = 20       # hidden / dropped file names a report lists
PREVIEW_HINT = "run `fae data preview CONFIG` to count them all and see the images as the model does"


class LoadTally:
    """Counts over the images one process (or one `fae data preview` scan) decoded."""

    def __init__(self, warn: bool = True) -> None:
        self.warn = warn
        self.reset()

    def reset(self) -> None:
        self.images = 0
        self.converted: Counter[str] = Counter()
        self.with_alpha = 0
        self.hidden: list[str] = []
        self.empty: list[str] = []
        self.huge = 0
        self.slowest: list[tuple[float, str, int]] = []     # a min-heap of (seconds, name, pixels)
        self.library_warnings: Counter[str] = Counter()
        self.dropped: list[str] = []
        self.non_square = 0
        self._warned: set[str] = set()

    def record(self, info: LoadInfo) -> None:
        self.images += 1
        if info.mode != "RGB":
            self.converted[info.mode] += 1
        self.with_alpha += info.has_alpha
        self.non_square += info.size[0] != info.size[1]
        if info.hidden:
            self.hidden.append(info.name)
            self._once("hidden", f"{info.name}: its content is hidden by the background colour (data.background); "
                       f"such images are counted, not warned about again; {PREVIEW_HINT}")
        if info.empty:
            self.empty.append(info.name)
            self._once("empty", f"{info.name}: fully transparent, an empty picture on any background; such images "
                       f"are counted, not warned about again; {PREVIEW_HINT}")
        if info.huge:
            self.huge += 1
            heapq.heappush(self.slowest, (info.seconds, info.name, info.size[0] * info.size[1]))
            if len(self.slowest) > SLOWEST_KEPT:
                heapq.heappop(self.slowest)
            self._once("huge", f"{info.name}: a huge image ({info.size[0]}x{info.size[1]} px, decoded in "
                       f"{info.seconds:.2f} s) is decoded again at every use; `fae data prepare` writes a copy at the "
                       f"training size (data.huge_pixels sets the threshold); {PREVIEW_HINT}")
        for category, message in info.warnings:
            self.library_warnings[category] += 1
            self._once(f"library:{category}", f"{info.name}: the imaging library warned {category}: {message}; "
                       f"further {category}s while opening images are counted (fae.data.tally.TALLY), not repeated; "
                       f"{PREVIEW_HINT}")

    def record_dropped(self, name: str) -> None:
        self.dropped.append(name)

    def slowest_files(self) -> list[dict[str, Any]]:
        return [{"file": name, "seconds": round(seconds, 3), "pixels": pixels}
                for seconds, name, pixels in sorted(self.slowest, reverse=True)]

    def summary(self) -> dict[str, Any]:
        """The counts as plain JSON-able data (what `fae data preview` writes)."""
        return {"images": self.images + len(self.dropped), "readable": self.images,
                "dropped": {"count": len(self.dropped), "files": self.dropped[:NAMES_SHOWN]},
                "modes_converted": dict(sorted(self.converted.items())), "with_alpha": self.with_alpha,
                "hidden_by_background": {"count": len(self.hidden), "files": self.hidden[:NAMES_SHOWN]},
                "fully_transparent": {"count": len(self.empty), "files": self.empty[:NAMES_SHOWN]},
                "non_square": self.non_square,
                "huge": {"count": self.huge, "slowest": self.slowest_files()},
                "library_warnings": dict(sorted(self.library_warnings.items()))}

    def _once(self, kind: str, message: str) -> None:
        if self.warn and kind not in self._warned:
            self._warned.add(kind)
            warnings.warn(message, RuntimeWarning, stacklevel=4)


TALLY = LoadTally()
