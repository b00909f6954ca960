"""Per-detector metrics of the serving app, through Ray Serve's metrics API (``ray.serve.metrics``):
they appear on every Ray node's Prometheus endpoint (``ray_`` prefixed; counters also with
``_total``), tagged ``detector`` next to Serve's own ``deployment``, ``replica`` and
``application`` tags:

    ray_msc_requests_total{detector}                 scoring requests answered (any status)
    ray_msc_request_errors_total{detector,status}    of them, answered with a 4xx / 5xx status
    ray_msc_request_latency_s{detector}              histogram: seconds from arrival to answer
    ray_msc_images_scored_total{detector}            images that got a score
    ray_msc_images_over_threshold_total{detector}    of them, above the detector's threshold
    ray_msc_image_score{detector}                    histogram of the scores

Beside them, ``recent(detector)``: this replica's share of its last ``window`` scored images
over the threshold, which ``GET /v1/model`` (and a registry's ``GET /v1/detectors/{name}``)
report next to the calibrated false-positive rate (``target_fpr``): a detector whose share
drifts well above its target is flagging more than it was calibrated to.

The app of one (checkpoint, index) pair is the detector ``default``. A request whose detector is
not known to exist (an unknown name, a request that failed auth before its name was checked)
is counted under ``-``: names that clients send never become series of their own."""

# No `from __future__ import annotations`: the module is imported by Serve deployments.
from collections import OrderedDict, deque

DEFAULT = "default"
UNKNOWN = "-"
WINDOW = 1000  # recent images per detector (rolling)
MAX_WINDOWS = 1024  # detectors whose window one replica keeps (least recently scored dropped)
LATENCY_BOUNDARIES_S = [0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0]
# Scores are sums of k squared distances between unit vectors: 0 .. 4k.
SCORE_BOUNDARIES = [0.01, 0.02, 0.05, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, 8.0]


class RecentWindow:
    """The last ``size`` scored images of one detector: how many were over the threshold."""

    def __init__(self, size: int = WINDOW):
        self.size, self.flags, self.over = int(size), deque(), 0

    def add(self, over: bool) -> None:
        self.flags.append(bool(over))
        self.over += bool(over)
        if len(self.flags) > self.size:
            self.over -= self.flags.popleft()

    def summary(self) -> dict:
        n = len(self.flags)
        return {"window_images": self.size, "images": n, "over_threshold": self.over,
                "over_threshold_share": self.over / n if n else None}


class DetectorMetrics:
    """One replica's metrics objects (made in the replica: Ray metrics do not pickle) and its
    recent windows. ``request`` once per scoring request, ``scored`` with its results."""

    def __init__(self, window: int = WINDOW, max_windows: int = MAX_WINDOWS):
        from ray.serve import metrics

        tag = ("detector",)
        self.requests = metrics.Counter("msc_requests", "scoring requests answered, by detector", tag)
        self.errors = metrics.Counter("msc_request_errors", "scoring requests answered with an error status",
                                      ("detector", "status"))
        self.latency = metrics.Histogram("msc_request_latency_s", "seconds from a scoring request's arrival "
                                         "to its answer", LATENCY_BOUNDARIES_S, tag)
        self.images = metrics.Counter("msc_images_scored", "images that got a score", tag)
        self.over = metrics.Counter("msc_images_over_threshold", "scored images above the detector's threshold", tag)
        self.scores = metrics.Histogram("msc_image_score", "the images' anomaly scores", SCORE_BOUNDARIES, tag)
        self.window, self.max_windows = int(window), int(max_windows)
        self.windows: "OrderedDict[str, RecentWindow]" = OrderedDict()

    def request(self, detector: "str | None", status: int, seconds: float) -> None:
        """One answered scoring request; ``detector`` None when its name is not a served detector."""
        tags = {"detector": detector or UNKNOWN}
        self.requests.inc(1, tags)
        if status >= 400:
            self.errors.inc(1, {**tags, "status": str(int(status))})
        self.latency.observe(max(0.0, float(seconds)), tags)

    def scored(self, detector: str, results: list) -> None:
        """A request's results (``ScoreResult.to_dict()``s): the images that got a score, those over
        the threshold (where the detector has one) and their scores; the detector's window."""
        tags = {"detector": detector}
        scored = [r for r in results if isinstance(r, dict) and r.get("score") is not None]
        if not scored:
            return
        self.images.inc(len(scored), tags)
        judged = [r for r in scored if r.get("is_anomaly") is not None]
        n_over = sum(1 for r in judged if r["is_anomaly"])
        if n_over:
            self.over.inc(n_over, tags)
        for r in scored:
            self.scores.observe(float(r["score"]), tags)
        if judged:
            win = self.windows.get(detector)
            if win is None:
                win = self.windows[detector] = RecentWindow(self.window)
                while len(self.windows) > self.max_windows:
                    self.windows.popitem(last=False)
            self.windows.move_to_end(detector)
            for r in judged:
                win.add(r["is_anomaly"])

    def recent(self, detector: str) -> dict:
        """This replica's window of ``detector``: {window_images, images, over_threshold, over_threshold_share}."""
        win = self.windows.get(detector)
        return (win or RecentWindow(self.window)).summary()

    def forget(self, detector: str) -> None:
        """Drop a detector's window (it was removed from the registry)."""
        self.windows.pop(detector, None)
