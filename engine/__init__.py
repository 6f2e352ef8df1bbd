"""The thin engine around the kernels: the command line today; whole-step capture and recipes next."""
