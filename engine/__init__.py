"""The thin engine around the kernels: every loss as an nn.Module (modules.py) and the command line;
whole-step capture and recipes next."""
