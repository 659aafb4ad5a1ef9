"""Edit-R2 core: sessions, intent reconstruction, flow sampling with log-probs, RL losses, rewards, MICE-Bench.

The core imports torch, numpy and pillow only; the diffusers, TRL and ComfyUI integrations live in their own packages.
"""

__version__ = "0.1.0"
