"""Logit knowledge distillation (issue #4): so far the reference (the spec); the fused ops follow."""
