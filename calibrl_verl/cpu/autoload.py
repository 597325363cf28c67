"""Import-to-activate hook: ``VERL_USE_EXTERNAL_MODULES=calibrl_verl.cpu.autoload``.

The normal route is our ``verl.plugins`` entry point calling :func:`calibrl_verl.cpu.activate_if_requested`.
This module is the same call for setups where entry points are disabled (``VERL_USE_EXTERNAL_PLUGINS=none``)
or not installed: verl 0.9.1 imports ``VERL_USE_EXTERNAL_MODULES`` in every process, before entry points,
and re-raises their errors. Still a no-op without ``CALIBRL_DEVICE=cpu``.
"""

from calibrl_verl.cpu import activate_if_requested

ACTIVE = activate_if_requested()
