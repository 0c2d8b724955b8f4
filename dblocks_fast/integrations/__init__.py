"""Other libraries' models, trained block-wise: `dblocks_fast.integrations.diffusers` (pip install -e
".[diffusers]"). Each module imports its library on import, so this package imports nothing."""
