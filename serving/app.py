"""Ray Serve scoring app: ``serve run serving/config.yaml`` (or ``serve run serving.app:build_app
key=value ...``, or ``msc serve``) builds it from one typed config (serving/settings.py).

    single layout (index_shards 0):  Gateway (serving/gateway.py) -> Model (serving/model.py)
    sharded layout (index_shards N): Gateway -> Model -> IndexShard-0 .. IndexShard-{N-1}
                                     (serving/sharded.py)
    registry (multiplexed):          Gateway -> Model, each replica holding at most
                                     max_detectors_per_replica detectors (msc_dist/registry.py)

Both layouts score through the same Scorer (``msc_dist.scorer``) and follow the published index
version the same way (``serving.model.Versions``); ``GET /v1/model`` reports the live version."""

from msc_dist.config import ConfigError
from serving.gateway import Gateway
from serving.model import MODEL_KEYS, Model
from serving.settings import AppConfig, load_api_key
from serving.sharded import IndexShard

# The IndexShard deployments' settings.
SHARD_KEYS = ("index", "device", "keep_versions")
OPTION_KEYS = ("model_options", "gateway_options", "shard_options")


def build_app(args: dict | None = None):
    """Application builder for ``serve run`` / ``serve deploy``: ``args`` are AppConfig keys
    (checked here, at deploy time: an unknown key or a value out of range is an error that names
    it). From Python, ``model_options`` / ``gateway_options`` / ``shard_options`` set deployment
    options (the YAML's ``deployments:`` section does the same for ``serve deploy``);
    ``shard_options`` is one dict for every index-shard group, or a list of one per group."""
    args = dict(args or {})
    opts = {k: args.pop(k, None) or {} for k in OPTION_KEYS}
    cfg = AppConfig.from_args(args)
    if not cfg.api_key_file:  # a key file may live on the replicas' nodes only; a variable or its absence is known here
        load_api_key(cfg)  # `serve run` with no key fails here, with the reason, instead of retrying replicas
    model_args = {k: getattr(cfg, k) for k in MODEL_KEYS}
    shards = []
    if cfg.index_shards > 0:
        n = cfg.index_shards
        per_group = opts["shard_options"] if isinstance(opts["shard_options"], list) else [opts["shard_options"]] * n
        if len(per_group) != n:
            raise ConfigError(f"shard_options has {len(per_group)} entries for index_shards {n}")
        shards = [IndexShard.options(name=f"IndexShard-{g}", **per_group[g]).bind(g, n, **{k: getattr(cfg, k) for k in SHARD_KEYS})
                  for g in range(n)]
    # A replica being replaced (a redeploy, a downscale) drains its requests for longer than one
    # may take, so that each ends with its answer (or a 503 from the deadline), never a cut connection.
    drain = {"graceful_shutdown_timeout_s": cfg.request_timeout_s + 10}
    # The Model loads in reconfigure: these args are its user_config unless the options (or the
    # YAML's deployments section) give one, which the bound args then complete.
    model = Model.options(**{"user_config": model_args, **drain, **opts["model_options"]}).bind(shards, **model_args)
    return Gateway.options(**{**drain, **opts["gateway_options"]}).bind(model, **cfg.args())


app = build_app

