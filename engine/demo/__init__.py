"""`flashdistill demo`: a real teacher distilled into a one-step student, end to end (issue #8)."""
