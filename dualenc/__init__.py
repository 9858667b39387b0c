"""The video-text dual encoder: open_clip towers with temporal heads (training, distillation and retrieval to come)."""

import data_specs as _data_specs  # noqa: F401  - first: arms the torchvision compatibility fix

__version__ = "0.1.0"


def __getattr__(name):  # create_model / list_models without importing torch for `dualenc --help`
    if name in ("create_model", "list_models", "get_model_config", "VideoTextModel"):
        from dualenc import model

        return getattr(model, name)
    raise AttributeError(name)
