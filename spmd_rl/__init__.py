"""spmd-rl: RL post-training for LLMs as one SPMD torchrun program."""

import importlib.util as _importlib_util
import os as _os

__version__ = "0.1.0"

# The Triton kernels live in the repository's top-level kernels/ folder and are imported as
# spmd_rl.kernels: an install maps them there (pyproject's package-dir). A source checkout run
# through PYTHONPATH has no such mapping, so the folder joins this package's search path; only
# kernels/ is reachable that way, as the loader is given that one location.
if _importlib_util.find_spec(__name__ + ".kernels") is None:
    _kernels = _os.path.join(_os.path.dirname(_os.path.dirname(_os.path.abspath(__file__))), "kernels")
    if _os.path.isfile(_os.path.join(_kernels, "__init__.py")):
        import sys as _sys

        _spec = _importlib_util.spec_from_file_location(__name__ + ".kernels", _os.path.join(_kernels, "__init__.py"),
                                                         submodule_search_locations=[_kernels])
        _module = _importlib_util.module_from_spec(_spec)
        _sys.modules[_spec.name] = _module
        try:
            _spec.loader.exec_module(_module)
        except BaseException:
            del _sys.modules[_spec.name]
            raise
        kernels = _module
