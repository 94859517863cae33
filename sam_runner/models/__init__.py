"""Networks. Every builder takes `num_classes` and `input_shape` (one sample, no batch dimension) as keywords."""
from sam_runner.models.resnet import resnet18
from sam_runner.models.small import cnn1d, keskar_c1, mlp
from sam_runner.models.wide_resnet import wide_resnet

__all__ = ["cnn1d", "keskar_c1", "mlp", "resnet18", "wide_resnet"]
