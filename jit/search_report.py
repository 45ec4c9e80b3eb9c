"""What task=search writes besides its tables: a Pareto point as a quant preset that runs
as it is, the Pareto plot, and the console summary (jit/search.py runs the search)."""

from __future__ import annotations

from pathlib import Path

from omegaconf import OmegaConf

from jit.atomic import atomic_path


def write_preset(path: Path, qcfg, trial) -> Path:
    """The trial's quant group as a config-group file (the run's `device` group applies)."""
    plain = qcfg.to_dict()
    plain.pop("device")
    plain["calibration_file"] = None  # calibrated by the run that uses the preset
    header = (f"# Pareto point of task=search: trial {trial.number}, FID {trial.user_attrs['fid']:.6g}, "
              f"{trial.user_attrs['energy_per_image_uJ']:.6g} uJ/image.\n"
              f"# python run.py --config-dir {path.parent.parent} quant={path.stem}\n")
    with atomic_path(path) as tmp:
        Path(tmp).write_text(header + OmegaConf.to_yaml(OmegaConf.create(plain)))
    return path


def plot_front(trials: list, front: list, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 4))
    ax.scatter([t.user_attrs["energy_per_image_uJ"] for t in trials], [t.user_attrs["fid"] for t in trials],
               color="0.6", s=18, label="trials")
    xs = [t.user_attrs["energy_per_image_uJ"] for t in front]
    ys = [t.user_attrs["fid"] for t in front]
    ax.plot(xs, ys, "o-", color="tab:red", label="Pareto front", drawstyle="steps-post")
    for k, (x, y) in enumerate(zip(xs, ys)):
        ax.annotate(f"pareto_{k}", (x, y), fontsize=7, xytext=(3, 3), textcoords="offset points")
    ax.set_xlabel("energy per image (uJ)")
    ax.set_ylabel("FID")
    ax.legend(fontsize=8)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=120, format="png")
    plt.close(fig)
    return path


def print_summary(summary: dict) -> None:
    print(f"search: {summary['complete_trials']} complete trials, Pareto front ({', '.join(summary['objectives'])}):")
    for row in summary["pareto"]:
        front = (f" (FID {row['fid_front']:.4g} over {row['front_fid_images']} images)"
                 if row["fid_front"] is not None else "")
        print(f"  pareto_{row['pareto_k']}: trial {row['trial']}  FID {row['fid']:.4g}{front}  "
              f"{row['energy_per_image_uJ']:.4g} uJ/image  {row['assignment']}")
