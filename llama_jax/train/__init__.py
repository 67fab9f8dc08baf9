"""Training: the step (loss, gradients, update), the run as named steps (loop.py), signals, locks and several
processes (runtime.py), and the metrics it writes."""
