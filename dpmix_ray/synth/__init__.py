"""Synthetic images for DP-Mix_Diff from diffusion models that never saw the private data.

The API the CLI and trainer call. Ray is imported only inside :func:`generate` (on a cache miss), so
importing this package, loading a set or drawing its grid stays light.
"""

from dpmix_ray.synth.sets import generate, generate_for, load_synthetic, read_provenance, resolve_synthetic
from dpmix_ray.synth.grid import save_grid
from dpmix_ray.synth.pipelines import BUILTINS

__all__ = ["BUILTINS", "generate", "generate_for", "load_synthetic", "read_provenance", "resolve_synthetic", "save_grid"]
