"""AIMC quantization of linear layers (docs/design.md "AIMC quantization").

Plain torch: no Lightning, no Hydra, no dependency on jit.models; layers are replaced
by module name on any nn.Module.
"""

from .config import (
                     ActConfig,
                     AdcConfig,
                     DeviceConfig,
                     QuantConfig,
                     SplitConfig,
                     WeightConfig,
                     build_device_config,
                     build_quant_config,
)
from .layers import (
                     BitSerialLinear,
                     HybridLinear,
                     QuantLinear,
                     StaticThresholds,
                     W8A8Linear,
                     quantized_layers,
)
from .noise import SAMPLE_ID_BOUND, sample_context
from .quantizers import percentile_abs, stable_seed
from .stats import collect_stats, enable_stats, merge_stats, reset_stats, snapshot_stats
from .surgery import (
                      adc_bypassed,
                      layer_configs,
                      noise_disabled,
                      quantize_model,
                      reseed,
                      restore_float,
                      target_names,
)

__all__ = [
                     "SAMPLE_ID_BOUND",
                     "ActConfig",
                     "AdcConfig",
                     "BitSerialLinear",
                     "DeviceConfig",
                     "HybridLinear",
                     "QuantConfig",
                     "QuantLinear",
                     "SplitConfig",
                     "StaticThresholds",
                     "W8A8Linear",
                     "WeightConfig",
                     "adc_bypassed",
                     "build_device_config",
                     "build_quant_config",
                     "collect_stats",
                     "enable_stats",
                     "layer_configs",
                     "merge_stats",
                     "noise_disabled",
                     "percentile_abs",
                     "quantize_model",
                     "quantized_layers",
                     "reseed",
                     "reset_stats",
                     "restore_float",
                     "sample_context",
                     "snapshot_stats",
                     "stable_seed",
                     "target_names",
]
