"""The single entry point: compose the Hydra config, validate, dispatch on `task`.

    python run.py                                  # built-in default: digits, hybrid W8A11 vs float
    python run.py experiment=digits_train          # train the digits model
    python run.py -m quant.adc.bits=4,6,8,10 quant.adc.noise_sigma_lsb=0,2,8
"""

from jit.openmp import prefer_short_spin

prefer_short_spin()  # before anything imports torch (jit/openmp.py)

import hydra  # noqa: E402
from omegaconf import DictConfig  # noqa: E402

from jit.config import register_schemas  # noqa: E402

register_schemas()


@hydra.main(version_base="1.3", config_path="configs", config_name="run")
def main(cfg: DictConfig):
    from jit.runner import main as run_task

    return run_task(cfg)


if __name__ == "__main__":
    main()
