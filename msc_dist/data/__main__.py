"""python -m msc_dist.data {make-shards, demo, describe}"""

from __future__ import annotations

import sys


def run(cmd: str, cfg) -> dict:
    """One data command from its config (``msc_dist.data.config``) -> a summary dict."""
    from msc_dist.config import ConfigError

    if cmd == "make-shards":
        from msc_dist.data.make_shards import make_shards

        if not cfg.src or not cfg.out:
            raise ConfigError("--from and --out are required")
        res = make_shards(cfg.src, cfg.out, cfg.exts, cfg.per_shard, cfg.normal_class, cfg.train_fraction, cfg.seed,
                          cfg.masks, cfg.groups)
        return {k: {"samples": v.count, "shards": len(v.shards), "labels": _labels(v), "masks": v.mask_count}
                for k, v in res.items()}
    if cmd == "demo":
        from msc_dist.data.demo import make_demo

        if not cfg.out:
            raise ConfigError("--out is required")
        tr, te = make_demo(cfg.out, cfg.n_train, cfg.n_test_normal, cfg.n_test_defect, cfg.size, seed=cfg.seed)
        return {"train": {"samples": tr.count, "labels": _labels(tr)}, "test": {"samples": te.count, "labels": _labels(te)}}
    from msc_dist.data.shards import describe

    if not cfg.data:
        raise ConfigError("give the shards to describe")
    info = describe(cfg.data)
    return {"samples": info.count, "shards": len(info.shards), "classes": info.classes, "labels": _labels(info),
            "masks": info.mask_count}


def main(argv: list[str] | None = None) -> int:
    """python -m msc_dist.data = ``msc data``: the same configs and parser pieces, without the
    rest of the command (the data package imports no job)."""
    import argparse
    import json

    from msc_dist.config import ConfigError, add_config_args, config_from_args
    from msc_dist.console import setup_logging
    from msc_dist.data.config import COMMANDS
    from msc_dist.data.shards import DataError

    p = argparse.ArgumentParser(prog="python -m msc_dist.data", description=__doc__)
    sub = p.add_subparsers(dest="cmd", required=True, metavar="COMMAND")
    for name, (cls, help_text, summary) in COMMANDS.items():
        sp = sub.add_parser(name, help=summary, description=summary)
        add_config_args(sp, cls, help_text)
    ns = p.parse_args(argv)
    setup_logging()
    cfg, _ = config_from_args(ns._config_cls, ns, p)
    try:
        print(json.dumps(run(ns.cmd, cfg), indent=1))
    except (ConfigError, DataError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


def _labels(info) -> dict:
    return {str(k): v for k, v in sorted(info.label_counts().items(), key=lambda kv: (kv[0] is None, kv[0] or 0))}


if __name__ == "__main__":
    sys.exit(main())
