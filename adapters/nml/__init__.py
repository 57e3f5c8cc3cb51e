"""The NML/EM neuromodulated sequence model (seed 003): memories written while it runs.

torch is imported by the submodules; importing this package imports it too, so other packages
import ``adapters.nml`` only where they use the model.
"""

from adapters.nml.model import NMLConfig, NMLModel, NMLOutput, detach_state
from adapters.nml.scan import scan, scan_reference

__all__ = ["NMLConfig", "NMLModel", "NMLOutput", "detach_state", "scan", "scan_reference"]
