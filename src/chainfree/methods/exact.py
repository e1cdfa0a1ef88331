"""Exact backprop: plain autograd. The baseline every other method is measured against."""

from chainfree.methods.base import Method


class Exact(Method):
    name = "exact"
