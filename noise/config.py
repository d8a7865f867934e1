"""The `mask:` section of a training config, declared beside the masks.

Imports nothing heavy (the mask modules load inside `check`), so `train.py --print-config` reads
the schema before torch loads.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class MaskConfig:
    """The `mask:` section: which masks hide which share of the patches."""

    schedule: str = "green"  # a colour, `random`, or `colour@epoch,...`
    ratio: float = 0.75  # share of patches hidden
    bank: str | None = None  # the authors' pattern file (.npz) instead of generated noise

    def check(self) -> list[str]:
        """Problems, one line each naming its key: the ratio, the schedule, an unreadable bank."""
        from noise.bank import load_pattern_file
        from noise.masks import MASK_TYPES, check_ratio, parse_schedule

        problems = []
        try:
            check_ratio(self.ratio)
        except ValueError:
            problems.append(f"mask.ratio {self.ratio} must lie strictly between 0 and 1")
        try:
            parse_schedule(self.schedule)
        except ValueError as err:
            problems.append(f"mask.schedule '{self.schedule}' is invalid ({err}); use one of "
                            f"{', '.join(MASK_TYPES)} or colour@epoch pairs like green@0,blue@200")
        if self.bank:
            try:
                load_pattern_file(self.bank)
            except (OSError, ValueError) as err:
                problems.append(f"mask.bank '{self.bank}': {err}")
        return problems
