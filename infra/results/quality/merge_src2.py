"""view_source_scale 2 results: the frozen kNN from the earlier runs (it does not train, so the views
do not touch it), msc/msc-fast from the runs at scale 2. Writes M_src2_all.json, T_src2.json."""
import json
import numpy as np
R = "/work/results/"
J = lambda n: json.load(open(R + n))
KEYS = ("roc_auc", "average_precision", "f1_at_threshold", "fpr_at_threshold", "fpr_at_95_tpr")

def remean(a):
    pc = a["classes"]
    for m in pc[next(iter(pc))]:
        a["mean"][m] = {k: float(np.mean([pc[c][m][k] for c in pc])) for k in KEYS}
        n = min(len(pc[c][m]["seeds"]) for c in pc)
        a["mean"][m]["roc_auc_std"] = float(np.std([np.mean([pc[c][m]["seeds"][i]["roc_auc"] for c in pc]) for i in range(n)]))
        a["mean"][m]["seconds"] = float(np.mean([pc[c][m].get("seconds", 0.0) for c in pc]))
    return a

def merge(knn_from, parts, note):
    out = J(knn_from)
    for c in out["classes"]:
        out["classes"][c] = {"knn": out["classes"][c]["knn"]}
    for p, methods in parts:
        d = J(p)
        for c, v in d["classes"].items():
            for m in methods:
                out["classes"][c][m] = v[m]
    out["mean"] = {}
    out["note"] = note
    out["config"]["view_source_scale"] = 2.0
    return remean(out)

if __name__ == "__main__":
    import sys
    m = merge("M_ours_all.json", [("Y_M_a.json", ("msc", "msc-fast")), ("Y_M_b.json", ("msc", "msc-fast"))],
              "knn from M_ours_all.json (no training); msc, msc-fast at view_source_scale 2: Y_M_a.json (digits 0-4) "
              "and Y_M_b.json (5-9), run at the same time in two processes")
    json.dump(m, open(R + "M_src2_all.json", "w"), indent=1)
    t = merge("T_ours2.json", [("X_T_src2.json", ("msc",)), ("Y_T_fast.json", ("msc-fast",))],
              "knn from T_ours2.json (no training); msc (X_T_src2.json) and msc-fast (Y_T_fast.json) at view_source_scale 2")
    json.dump(t, open(R + "T_src2.json", "w"), indent=1)
    print({k: v["roc_auc"] for k, v in m["mean"].items()}, {k: v["roc_auc"] for k, v in t["mean"].items()})
