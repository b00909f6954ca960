"""README tables from the bench quality JSON results (this session's CPU runs)."""
import json, os, sys
R = "/work/results"
def J(n):
    p = os.path.join(R, n)
    return json.load(open(p)) if os.path.exists(p) else None

def f(x, k="roc_auc", sd=True):
    if x is None:
        return ""
    s = f"{x[k]:.4f}"
    if sd and (k + "_std") in x:
        s += f" ± {x[k + '_std']:.4f}"
    return s

def table(name, ours, ref, classes, label):
    out = []
    out.append(f"| {label} | knn | msc `paper` | msc `fast` | reference loop, knn | reference loop, msc `paper` | ours − reference (`paper`) |")
    out.append("|---|---|---|---|---|---|---|")
    rows = []
    for c in classes:
        o, r = ours["classes"].get(c), (ref or {}).get("classes", {}).get(c)
        if o is None:
            continue
        d = (o["msc"]["roc_auc"] - r["msc"]["roc_auc"]) if r else None
        out.append(f"| {c} | {f(o['knn'])} | {f(o['msc'])} | {f(o['msc-fast'])} | {f(r and r['knn'])} | {f(r and r['msc'])} | "
                   + (f"{d:+.4f}" if d is not None else "") + " |")
        rows.append(c)
    m, mr = ours["mean"], (ref or {}).get("mean", {})
    # means over the classes both have
    import numpy as np
    def mean(res, meth, k="roc_auc"):
        return float(np.mean([res["classes"][c][meth][k] for c in rows if c in res["classes"]]))
    def mean_sd(res, meth):
        n = min(len(res["classes"][c][meth]["seeds"]) for c in rows)
        by = [np.mean([res["classes"][c][meth]["seeds"][i]["roc_auc"] for c in rows]) for i in range(n)]
        return f"{np.mean(by):.4f} ± {np.std(by):.4f}"
    have_ref = ref and all(c in ref["classes"] for c in rows)
    out.append(f"| **mean** | {mean_sd(ours,'knn')} | {mean_sd(ours,'msc')} | **{mean_sd(ours,'msc-fast')}** | "
               + (f"{mean_sd(ref,'knn')} | {mean_sd(ref,'msc')} | {mean(ours,'msc')-mean(ref,'msc'):+.4f}" if have_ref else " | | ") + " |")
    out.append("")
    out.append(f"| {label} | AP knn | AP `paper` | AP `fast` | seconds knn | seconds `paper` | seconds `fast` | `fast` / `paper` time |")
    out.append("|---|---|---|---|---|---|---|---|")
    for c in rows:
        o = ours["classes"][c]
        out.append(f"| {c} | {f(o['knn'],'average_precision',False)} | {f(o['msc'],'average_precision',False)} | "
                   f"{f(o['msc-fast'],'average_precision',False)} | {o['knn']['seconds']:.0f} | {o['msc']['seconds']:.0f} | "
                   f"{o['msc-fast']['seconds']:.0f} | {o['msc-fast']['train_seconds']/o['msc']['train_seconds']:.2f} |")
    out.append(f"| **mean** | {mean(ours,'knn','average_precision'):.4f} | {mean(ours,'msc','average_precision'):.4f} | "
               f"{mean(ours,'msc-fast','average_precision'):.4f} | {mean(ours,'knn','seconds'):.0f} | {mean(ours,'msc','seconds'):.0f} | "
               f"{mean(ours,'msc-fast','seconds'):.0f} | {mean(ours,'msc-fast','train_seconds')/mean(ours,'msc','train_seconds'):.2f} |")
    k, p, fa = mean(ours, "knn"), mean(ours, "msc"), mean(ours, "msc-fast")
    out.append("")
    out.append(f"Error removed (1 − ROC-AUC, relative to frozen kNN): `paper` {100*(p-k)/(1-k):.0f} %, `fast` {100*(fa-k)/(1-k):.0f} %.")
    return "\n".join(out), rows

def squash_table(pairs):
    out = ["| data | knn, center_crop | knn, squash | msc `fast`, center_crop | msc `fast`, squash |", "|---|---|---|---|---|"]
    import numpy as np
    for label, cc, sq in pairs:
        if not (cc and sq):
            continue
        cs = [c for c in sq["classes"] if c in cc["classes"]]
        def mm(res, meth):
            if meth not in res["classes"][cs[0]]:
                return float("nan")
            return float(np.mean([res["classes"][c][meth]["roc_auc"] for c in cs]))
        out.append(f"| {label} ({len(cs)} classes, seeds {sq['seeds']}) | {mm(cc,'knn'):.4f} | {mm(sq,'knn'):.4f} | {mm(cc,'msc-fast'):.4f} | {mm(sq,'msc-fast'):.4f} |")
    return "\n".join(out)

if __name__ == "__main__":
    mo, mr = J("M_ours_all.json") or J("M_ours.json"), J("M_ref.json")
    to, tr = J("T_ours2.json") or J("T_ours.json"), J("T_ref.json")
    if mo:
        t, rows = table("MNIST", mo, mr, [str(i) for i in range(10)], "digit")
        print("MNIST:\n" + t + "\n")
    if to:
        t, _ = table("tiles", to, tr, ["MT_Free"], "normal class")
        print("TILES:\n" + t + "\n")
    print(squash_table([("MNIST", mo, J("M_squash.json")), ("magnetic tiles", to, J("T_squash2.json") or J("T_squash.json"))]))
