"""Training-framework callbacks built on the public API (``SymmetryTracker``, ``find_symmetries``, the run
folder).  Import the one you use; this package imports no framework by itself:

    from neural_mechanics_ext.integrations.huggingface import SymmetryCallback   # transformers.Trainer
    from neural_mechanics_ext.integrations.lightning import SymmetryCallback     # lightning.pytorch.Trainer
"""
