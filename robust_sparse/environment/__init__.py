"""The installed stack and its repairs: ``robust-sparse doctor`` (doctor), the import-time fixes for robustbench
1.1.1 (compat) and the adapter that serves pyautoattack under the name ``autoattack`` (autoattack_alias).

Imported at every interpreter start by the ``.pth`` hook that ``doctor --fix`` installs: nothing here may import
torch at module level."""
