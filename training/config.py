"""The training config model. Defined in models/ (the service validates fine-tune requests with
it, and the service never imports training/); re-exported here for training code."""
from models.jobs.train_config import (  # noqa: F401
    BACKBONE_NAMES,
    CLASS_BALANCE,
    CONFIG_FILE,
    DEVICES,
    INSTANT_STRATEGIES,
    STRATEGIES,
    TRAINED_STRATEGIES,
    ConfigError,
    TrainConfig,
)
