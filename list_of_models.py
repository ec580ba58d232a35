"""The model registry: names for the compressed models that finished searches produced.

``main_reduce_retrain_*.py --baseline_model=NAME`` looks NAME up here to find the
compressed model (and its mask) to retrain.

Entries are added
  * by a search run with ``--register NAME`` when it ends, or
  * afterwards with ``python -m gsparsity.registry NAME EXPERIMENT_FOLDER``, or
  * by hand, following the example below.

Each entry maps a name (a Python identifier) to:
  experiment_dir  the search's experiment folder, relative to the folder of this
                  file when it lies under it, else absolute
  small_model     the compressed model in that folder (small_model_<scope>_<threshold>.pth.tar)
  mask            the mask in that folder (mask_<scope>_<threshold>.json)
  scope           conv12 or all_conv: which convs the search pruned
  arch            the torchvision architecture, e.g. resnet50

This file is only ever read as data (never imported or run by the tools). When a
model is registered, only the ``MODELS = {...}`` literal below is rewritten: notes
and comments outside its braces are kept, comments inside them are not.

Lines of the original's list_of_models.py, ``name = 'folder'``, may stand here too,
and the original's file may be given as it is (``--registry FILE``): such a name is
the small_model_<scope>_1e-06.pth.tar in that folder (else its newest small model),
with the original's mask_<threshold>.npy (or our mask file) beside it. Nothing but such
lines, the literal, strings and comments may be in this file.
"""

# Example entry:
#   "pretrained_conv12_layer_adaptive_mu_0_05": {
#       "experiment_dir": "experiments/conv12_lr_0.001_momentum_0.9_wd_0.05_...",
#       "small_model": "small_model_conv12_1e-06.pth.tar",
#       "mask": "mask_conv12_1e-06.json",
#       "scope": "conv12",
#       "arch": "resnet50",
#   },
MODELS = {}
