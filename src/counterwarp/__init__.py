"""counterwarp: explain image classifiers with a conditional warping simulator."""

__version__ = "0.1.0"
