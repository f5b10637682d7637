"""The learned-attention testbed: a small Wan-architecture video DiT trained on procedural videos.

data.py (videos, prompts, conditioning), model.py (config, load/save), train.py (flow matching),
generate.py (sampling), head_stats.py / adherence.py / report.py (evidence), quality.py (the
sparse-vs-dense quality harness and the uniform baselines). See docs/testbed.md.
"""
