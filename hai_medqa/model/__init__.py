"""EXAONE-3.5 as a native transformers Llama: layout mapping, exact conversion, acquisition, loading.
Import the submodules directly (kept light: nothing heavy at import)."""
