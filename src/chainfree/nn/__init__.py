"""Layers and execution helpers built on chainfree.ops that models and methods compose: stacked execution of
many same-structure modules (`chainfree.nn.stacked`) and swap-in layers."""
