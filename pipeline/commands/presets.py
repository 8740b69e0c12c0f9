"""`nps presets`: the experiments shipped with nps, runnable by name (`nps run NAME`)."""
from __future__ import annotations


def register(sub) -> None:
    p = sub.add_parser("presets", help="list the experiments shipped with nps",
                       description="List the preset experiments (name, description, model, spaces, subnetworks, "
                                   "dataset); run one with `nps run NAME`, show it with "
                                   "`nps run NAME --print-config`.")
    p.set_defaults(func=run)


def run(args) -> int:
    from nps.pipeline.experiment.config import expand_spaces, parse_config, preset_names, preset_text
    from nps.pipeline.words import plural

    for name in preset_names():
        cfg = parse_config(preset_text(name), f"preset {name}")
        spaces = expand_spaces(cfg)
        n = sum(p.rows for p in spaces)
        print(f"{name}\n    {cfg.experiment.description}\n    {cfg.model.name}, {plural(len(spaces), 'space')}, "
              f"{plural(n, 'subnetwork')}, dataset {cfg.dataset.dir}")
    print("run one with `nps run NAME`; show its settings with `nps run NAME --print-config`")
    return 0
