# dataset classes live in plain modules here; builders (registered) live in ``builders``.
from lavis_plugins._autoimport import import_submodules

import_submodules(__name__, __path__)
