"""DenseNet models and their ImageNet weights."""
from mura_jax.models.densenet import (
    ARCHS, DenseNet, DenseNet121, DenseNet161, DenseNet169, DenseNet201, create_model,
    init_variables, variable_shapes)
from mura_jax.models.weights import (
    IMAGENET_MEAN, IMAGENET_STD, WeightsMismatchError, WeightsNotFoundError, adapt_input_channels,
    initial_variables, load_keras, load_torchvision, model_input, replace_head, save_safetensors,
    to_torchvision)

__all__ = [
    'ARCHS', 'DenseNet', 'DenseNet121', 'DenseNet161', 'DenseNet169', 'DenseNet201', 'create_model',
    'init_variables', 'variable_shapes', 'IMAGENET_MEAN', 'IMAGENET_STD', 'WeightsMismatchError',
    'WeightsNotFoundError', 'adapt_input_channels', 'initial_variables', 'load_keras',
    'load_torchvision', 'model_input', 'replace_head', 'save_safetensors', 'to_torchvision',
]
