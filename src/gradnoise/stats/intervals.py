"""Small-sample intervals of a mean, for quantities measured once per seed."""
from __future__ import annotations

import math
import statistics
from typing import Any, Dict, List, Optional

from scipy.stats import t


def mean_interval(values: List[float], lower: Optional[float] = None) -> Dict[str, Any]:
    """Mean and a 95 % t-interval over seeds (``[nan, nan]`` below two values), its low
    end clipped at ``lower`` for a quantity that cannot go below it (steps, seconds)."""
    vals = [v for v in values if v is not None and math.isfinite(v)]
    if not vals:
        return {"mean": None, "interval": [math.nan, math.nan], "n": 0}
    m = statistics.fmean(vals)
    if len(vals) < 2:
        return {"mean": m, "interval": [math.nan, math.nan], "n": 1}
    half = float(t.ppf(0.975, len(vals) - 1)) * statistics.stdev(vals) / math.sqrt(len(vals))
    low = m - half if lower is None else max(m - half, lower)
    return {"mean": m, "interval": [low, m + half], "n": len(vals)}
