"""Hydra plugin of optimus_ckpt: makes ``load_strategy=<preset>`` work in any Hydra app.

Only registers things: the preset search path, the LoadStrategy schema and the
``optimus_ckpt.latest`` resolver. Imports no torch (Hydra imports every plugin at start-up).
Found by Hydra 1.3's ``hydra_plugins`` scan and by Hydra 1.4's ``hydra.plugins`` entry point.
"""

from hydra.core.config_search_path import ConfigSearchPath
from hydra.plugins.search_path_plugin import SearchPathPlugin

from optimus_ckpt.hydra_support import conf_search_path, register_configs

register_configs()


class OptimusCkptSearchPathPlugin(SearchPathPlugin):
    def manipulate_search_path(self, search_path: ConfigSearchPath) -> None:
        path = conf_search_path()
        if all(element.path != path for element in search_path.get_path()):
            search_path.append(provider="optimus_ckpt", path=path)
