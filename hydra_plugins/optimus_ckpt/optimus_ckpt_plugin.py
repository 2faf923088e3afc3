"""Hydra plugin of optimus_ckpt: makes ``load_strategy=<preset>`` work in any Hydra app.

Only registers things: the preset search path, the LoadStrategy schema and the
``optimus_ckpt.latest`` resolver. Imports no torch (Hydra imports every plugin at start-up).
Found by Hydra 1.3's ``hydra_plugins`` scan and by Hydra 1.4's ``hydra.plugins`` entry point.

Hydra imports this module at the start of *every* app in the environment, and an exception other
than ImportError here would crash all of them; so a failure to register is reported as a warning
and the app runs on (it only fails if it actually selects a ``load_strategy`` preset).
"""

import warnings

from hydra.core.config_search_path import ConfigSearchPath
from hydra.plugins.search_path_plugin import SearchPathPlugin

from optimus_ckpt.hydra_support import conf_search_path, register_configs

try:
    register_configs()
except Exception as exc:  # pragma: no cover - defensive: never break unrelated Hydra apps
    warnings.warn(f"optimus_ckpt: could not register its Hydra configs: {exc!r}", stacklevel=1)


class OptimusCkptSearchPathPlugin(SearchPathPlugin):
    def manipulate_search_path(self, search_path: ConfigSearchPath) -> None:
        try:
            path = conf_search_path()
        except FileNotFoundError as exc:  # pragma: no cover - a broken install
            warnings.warn(f"optimus_ckpt: {exc}", stacklevel=1)
            return
        if all(element.path != path for element in search_path.get_path()):
            search_path.append(provider="optimus_ckpt", path=path)
