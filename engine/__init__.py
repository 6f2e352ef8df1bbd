"""The thin engine around the kernels.

    capture, Engine, CapturedStep   a whole training step captured once and replayed (runtime.py):
                                    CUDA graphs on a GPU, eager or torch.compile on the CPU
    Step, Recipe                    what a step is to the engine (step.py)
    recipes                         DMD2, SiD, VSD, consistency distillation and LLM KD as steps
    modules                         every loss as an nn.Module
    cli                             the ``flashdistill`` command
"""

from flashdistill.engine.runtime import CapturedStep, Engine, capture
from flashdistill.engine.step import Recipe, Step

__all__ = ["capture", "Engine", "CapturedStep", "Step", "Recipe"]
