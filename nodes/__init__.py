"""ComfyUI nodes and the native-MODEL patch: the only folder that imports comfy, comfy_api,
folder_paths or server, and only from the modules ComfyUI loads through ``extension.py``.

Comfy-free (unit-testable without ComfyUI): override.py (the attention override and its helpers),
step_tracker.py, strategy_view.py, compare_frames.py, latent_convention.py.
"""
