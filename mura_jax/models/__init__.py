"""DenseNet models and their ImageNet weights."""
from mura_jax.models.densenet import (
    ARCHS, DenseNet, DenseNet121, DenseNet161, DenseNet169, DenseNet201, create_model,
    init_variables, variable_shapes)
from mura_jax.models.imagenet import adapt_input_channels, initial_variables, replace_head
from mura_jax.models.keras_weights import load_keras
from mura_jax.models.weights import (
    WeightsMismatchError, WeightsNotFoundError, load_torchvision, model_input, save_safetensors,
    to_torchvision)

__all__ = [
    'ARCHS', 'DenseNet', 'DenseNet121', 'DenseNet161', 'DenseNet169', 'DenseNet201', 'create_model',
    'init_variables', 'variable_shapes', 'WeightsMismatchError',
    'WeightsNotFoundError', 'adapt_input_channels', 'initial_variables', 'load_keras',
    'load_torchvision', 'model_input', 'replace_head', 'save_safetensors', 'to_torchvision',
]
