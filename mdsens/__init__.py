"""mdsens: exact sensitivities of particle systems at mechanical equilibrium.

Relax with any minimizer, then differentiate the equilibrium implicitly:
``H · ∂x*/∂θ = −∂θ∇ₓE``. See docs/design.md for the math and README.md for the tour.
"""

__version__ = "0.1.0"

import os as _os
import sys as _sys

# The `mdsens` command uses a persistent compilation cache (mdsens.cache), and
# XLA:CPU logs a spurious ERROR line per cache hit ("target machine feature
# +prefer-no-gather is not supported": a tuning flag, not a CPU feature). Its C++
# logger reads this once, when jaxlib loads, i.e. before the CLI's own code runs.
# Only for the console script; an explicit setting wins.
if _os.path.basename(_sys.argv[0] if _sys.argv else "") == "mdsens":
    _os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

from mdsens.implicit import cotangent, custom_fixed_point, custom_root, tangent  # noqa: E402
from mdsens.linsolve import SolveInfo, cg, dense  # noqa: E402
from mdsens.system import System  # noqa: E402

__all__ = [
    "__version__",
    "System",
    "SolveInfo",
    "cg",
    "cotangent",
    "custom_fixed_point",
    "custom_root",
    "dense",
    "tangent",
]
