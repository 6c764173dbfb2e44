"""mdsens: exact sensitivities of particle systems at mechanical equilibrium.

Relax with any minimizer, then differentiate the equilibrium implicitly:
``H · ∂x*/∂θ = −∂θ∇ₓE``. See DESIGN.md for the math and README.md for the tour.
"""

__version__ = "0.1.0"

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
