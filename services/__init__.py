"""stepaudio2: the production serving platform for Step-Audio 2."""

__version__ = "0.1.0"
